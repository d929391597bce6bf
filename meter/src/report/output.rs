//! What each report shows: an [`Output`] built from the report's rows, with named columns of a
//! [`Kind`], one row of [`Cell`]s per group and a `TOTAL` row of the summed figures; printing it
//! is `render`'s job.

use serde_json::{Value, json};

use super::rows::ratio;
use super::{
    ChargebackRow, Dimension, Drift, FrontierRow, LoopRow, OutcomeCostRow, Period, StuffingRow, Totals, UntaggedRow,
    format_usd, key_columns, per_outcome,
};

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
}

impl Output {
    /// Per group: outcomes of `kind`, their value, the spend on them, cost per outcome, outcomes
    /// per dollar, and the spend that produced none.
    pub fn cost_per_outcome(period: Period, kind: &str, by: Dimension, rows: &[OutcomeCostRow]) -> Output {
        let per_usd = |outcomes: u64, cost: i64| Cell::Float(ratio(outcomes as f64, cost as f64 / 1e9));
        let body = rows
            .iter()
            .map(|r| {
                vec![
                    Cell::Text(r.key.clone()),
                    Cell::UInt(r.outcomes),
                    Cell::Float(r.value),
                    Cell::Int(r.outcome_cost_nanos),
                    Cell::Int(r.cost_per_outcome_nanos()),
                    per_usd(r.outcomes, r.outcome_cost_nanos),
                    Cell::Int(r.other_cost_nanos),
                ]
            })
            .collect();
        let outcomes: u64 = rows.iter().map(|r| r.outcomes).sum();
        let cost: i64 = rows.iter().map(|r| r.outcome_cost_nanos).sum();
        let other: i64 = rows.iter().map(|r| r.other_cost_nanos).sum();
        let value: f64 = rows.iter().map(|r| r.value).sum();
        let group = by.columns().first().copied().unwrap_or("key");
        Output {
            name: "cost-per-outcome",
            title: format!("cost per {kind} outcome, by {}", by.name()),
            period,
            parameters: vec![("kind", json!(kind)), ("by", json!(by.name()))],
            columns: cols(&[
                (group, Kind::Key),
                ("outcomes", Kind::Number),
                ("value", Kind::Float(2)),
                ("outcome_cost_usd", Kind::Usd),
                ("cost_per_outcome_usd", Kind::Usd),
                ("outcomes_per_usd", Kind::Float(4)),
                ("no_outcome_cost_usd", Kind::Usd),
            ]),
            rows: body,
            total: Some(total_row(
                1,
                vec![
                    Cell::UInt(outcomes),
                    Cell::Float(value),
                    Cell::Int(cost),
                    Cell::Int(per_outcome(cost, outcomes)),
                    per_usd(outcomes, cost),
                    Cell::Int(other),
                ],
            )),
        }
    }
}

/// A total row: `TOTAL` under the first grouping column, blanks under the others.
fn total_row(keys: usize, figures: Vec<Cell>) -> Vec<Cell> {
    let mut cells: Vec<Cell> =
        (0..keys).map(|i| if i == 0 { Cell::Text("TOTAL".into()) } else { Cell::Empty }).collect();
    cells.extend(figures);
    cells
}
