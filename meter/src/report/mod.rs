//! Chargeback and the reference's failure modes as reports: SQL over `usage_events FINAL`, typed rows, and table, CSV or JSON text.
//!
//! Every figure is read with `FINAL`, so a replayed or re-sent event (same `event_id`) counts
//! once. Money stays integer nano-USD from ClickHouse to the printed `12.345678901`; ratios and
//! averages are the only floats. The SQL avoids JOIN (its syntax differs between ClickHouse
//! 18.16 and current releases) and runs on both; migration 0003 holds the same queries as views,
//! one calendar month (UTC) per row.
//!
//! Here: the failure-mode defaults, [`ReportError`], the groupings ([`Dimension`]) and
//! [`Reporter`], which runs the queries. `period` holds the time window a report covers, `sql`
//! the query each report runs, `rows` the typed rows read back with their totals and ratios,
//! `output` each report's columns, cells and total row, and `render` the table, CSV and JSON text.

use std::time::{SystemTime, UNIX_EPOCH};

use clickhouse::{Client, Row};
use serde::Serialize;
use tollgate_schemas::policy::PriceCard;

use tollgate_store::ClickHouseConfig;

use crate::window::Granularity;
use tollgate_store::migrate::check_database_name;

mod output;
mod period;
mod render;
mod rows;
pub mod sql;
#[cfg(test)]
mod tests;

pub use output::{Cell, Kind, Output};
pub use period::{Period, fmt_time, parse_instant};
pub use render::{Format, format_usd};
pub use rows::{
    ChargebackRow, Drift, DriftRow, FrontierRow, LoopRow, OutcomeCostRow, StuffingRow, Totals, UntaggedRow,
    drift_against_previous, per_outcome,
};

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

#[derive(Debug, Clone, Row, Serialize)]
struct TierRow {
    sync_id: u64,
    provider: String,
    model: String,
    tier: String,
    price_card_version: String,
}

/// One report to run: chargeback by its groupings, a failure mode with its threshold, or cost
/// per outcome. `tollgate-meter report` and the console build their [`Output`] through
/// [`Reporter::output`], so the console's CSV is the report's.
#[derive(Debug, Clone, PartialEq)]
pub enum Which {
    Chargeback(Vec<Dimension>),
    FrontierShare(f64),
    ContextStuffing(u64),
    Loops(f64),
    Drift(f64),
    Untagged,
    CostPerOutcome { kind: String, by: Dimension },
}

/// One group's spend in one day or month of a period (the console's charts).
#[derive(Debug, Clone, Row, serde::Deserialize)]
pub struct SeriesRow {
    /// The day (`2026-12-07`) or the month's first day, UTC.
    pub bucket: String,
    pub keys: Vec<String>,
    pub cost_nanos: i64,
}

/// The step of a spend series.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Day,
    Month,
}

/// Runs the reports against one database.
#[derive(Clone)]
pub struct Reporter {
    client: Client,
    db: String,
}

/// Where a report reads its figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `usage_events FINAL`: one row per event.
    Raw,
    /// `usage_windows FINAL` at this granularity: one row per window and dimension combination.
    Rollups(Granularity),
}

impl Source {
    /// The rollups when whole windows tile the period, else the raw events.
    pub fn for_period(p: &Period) -> Source {
        p.tiled_by().map_or(Source::Raw, Source::Rollups)
    }
}

impl Reporter {
    pub fn new(cfg: &ClickHouseConfig) -> Result<Self, ReportError> {
        check_database_name(&cfg.database).map_err(ReportError::Argument)?;
        Ok(Reporter { client: cfg.client(), db: cfg.database.clone() })
    }

    pub fn database(&self) -> &str {
        &self.db
    }

    /// Cost per group of `dims` (at least one) in the period, largest first: from the rollup
    /// windows when whole windows tile the period (a month, whole days, hours or minutes), else
    /// from the raw events.
    pub async fn chargeback(&self, dims: &[Dimension], p: &Period) -> Result<Vec<ChargebackRow>, ReportError> {
        self.chargeback_from(dims, p, Source::for_period(p)).await
    }

    /// Chargeback read from `source` (`Rollups(g)` only where `g` tiles the period).
    pub async fn chargeback_from(
        &self,
        dims: &[Dimension],
        p: &Period,
        source: Source,
    ) -> Result<Vec<ChargebackRow>, ReportError> {
        if dims.is_empty() {
            return Err(ReportError::Argument("chargeback needs at least one grouping (--by)".into()));
        }
        let sql = match source {
            Source::Raw => sql::chargeback(&self.db, dims, p),
            Source::Rollups(g) if p.tiled_by().is_some_and(|t| g <= t) => sql::chargeback_rollups(&self.db, dims, p, g),
            Source::Rollups(g) => {
                return Err(ReportError::Argument(format!("{} windows do not tile {}", g.as_str(), p.describe())));
            }
        };
        Ok(self.client.query(&sql).fetch_all().await?)
    }

    /// The report `which` over `p`, ready to render.
    pub async fn output(&self, which: &Which, p: Period) -> Result<Output, ReportError> {
        Ok(match which {
            Which::Chargeback(dims) => Output::chargeback(dims, p, &self.chargeback(dims, &p).await?),
            Which::FrontierShare(t) => Output::frontier_share(p, *t, &self.frontier_share(&p).await?),
            Which::ContextStuffing(t) => Output::context_stuffing(p, *t, &self.context_stuffing(&p).await?),
            Which::Loops(k) => Output::loops(p, *k, &self.loops(&p, *k).await?),
            Which::Drift(t) => Output::drift(p, *t, &self.drift(&p, *t).await?),
            Which::Untagged => Output::untagged(p, self.total_cost(&p).await?, &self.untagged(&p).await?),
            Which::CostPerOutcome { kind, by } => {
                Output::cost_per_outcome(p, kind, *by, &self.cost_per_outcome(kind, *by, &p).await?)
            }
        })
    }

    /// Cost per group of `dims` per day or month of the period, oldest first: from the day (or,
    /// by month over whole months, the month) rollups when they tile the period, else from the
    /// raw events.
    pub async fn chargeback_series(
        &self,
        dims: &[Dimension],
        p: &Period,
        step: Step,
    ) -> Result<Vec<SeriesRow>, ReportError> {
        if dims.is_empty() {
            return Err(ReportError::Argument("a series needs at least one grouping".into()));
        }
        let g = match (p.tiled_by(), step) {
            (Some(Granularity::Month), Step::Month) => Some(Granularity::Month),
            (Some(Granularity::Month | Granularity::Day), _) => Some(Granularity::Day),
            _ => None,
        };
        Ok(self.client.query(&sql::chargeback_series(&self.db, dims, p, step, g)).fetch_all().await?)
    }

    /// The outcome kinds posted in the period, most outcomes first.
    pub async fn outcome_kinds(&self, p: &Period) -> Result<Vec<String>, ReportError> {
        Ok(self.client.query(&sql::outcome_kinds(&self.db, p)).fetch_all().await?)
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

    /// Cost per outcome of `kind`, grouped by `by` (any grouping but `model`: outcomes have none).
    pub async fn cost_per_outcome(
        &self,
        kind: &str,
        by: Dimension,
        p: &Period,
    ) -> Result<Vec<OutcomeCostRow>, ReportError> {
        if !tollgate_schemas::outcome::valid_kind(kind) {
            return Err(ReportError::Argument(format!(
                "--kind must be a word (a lowercase letter, then lowercase letters, digits or _), not {kind:?}"
            )));
        }
        let [group] = by.columns() else {
            return Err(ReportError::Argument(format!("outcomes cannot be grouped by {}", by.name())));
        };
        Ok(self.client.query(&sql::cost_per_outcome(&self.db, kind, group, p)).fetch_all().await?)
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
