//! The typed rows the report queries read back, one struct per query, and what is derived from
//! them: the exact integer [`Totals`] of chargeback rows, shares and averages (the only floats),
//! and each model version's token-ratio change against the version seen before it ([`Drift`]).

use clickhouse::Row;
use serde::Deserialize;

pub(super) fn ratio(num: f64, den: f64) -> f64 {
    if den > 0.0 { num / den } else { 0.0 }
}

/// One chargeback group: `keys` are the grouping values in the order of [`key_columns`](super::key_columns).
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

/// One group of `cost-per-outcome`: its outcomes of the kind, what they are worth, the spend on
/// them and the spend on none of them (`tollgate_schemas::outcome::sql`).
#[derive(Debug, Clone, PartialEq, Row, Deserialize)]
pub struct OutcomeCostRow {
    /// Always 0 in the report (one bucket: the period); a month in the views.
    pub bucket: u8,
    pub kind: String,
    pub key: String,
    pub outcomes: u64,
    pub value: f64,
    pub outcome_cost_nanos: i64,
    pub other_cost_nanos: i64,
}

impl OutcomeCostRow {
    /// The spend on the group's outcomes over their number, rounded to the nearest nano-USD; 0
    /// without outcomes.
    pub fn cost_per_outcome_nanos(&self) -> i64 {
        per_outcome(self.outcome_cost_nanos, self.outcomes)
    }
}

/// `cost_nanos / outcomes`, rounded half away from zero; 0 when there is no outcome.
pub fn per_outcome(cost_nanos: i64, outcomes: u64) -> i64 {
    match i64::try_from(outcomes) {
        Ok(n) if n > 0 => (i128::from(cost_nanos) * 2 + i128::from(n)).div_euclid(2 * i128::from(n)) as i64,
        _ => 0,
    }
}
