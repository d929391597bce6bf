//! The SQL every report runs, for a database `db` (checked by the caller) and a period.
//! Each function returns one statement over `usage_events FINAL` (chargeback also over the rollup
//! windows, `usage_windows FINAL`); what it splices in is the
//! database name, column names from [`Dimension`], and numbers (the [`Period`] bounds, `k`).

use super::{Dimension, Period, Step, key_columns};
use crate::window::Granularity;
use tollgate_schemas::measures::{self, DRIFT_ROWS, LOOP_ROWS, SESSION_HOUR_HAS_TOKENS, STUFFING_ROWS};
use tollgate_schemas::usage::sql::{PROMPT_TOKENS as PROMPT, TOTAL_TOKENS as TOKENS};

/// Chargeback from the rollup windows of granularity `g` (which must tile the period, see
/// [`Period::tiled_by`]): the same figures as [`chargeback`], read from one row per window and
/// dimension combination instead of one per event.
pub fn chargeback_rollups(db: &str, dims: &[Dimension], p: &Period, g: Granularity) -> String {
    let cols = key_columns(dims);
    let list = cols.join(", ");
    format!(
        "SELECT [{list}] AS keys, toUInt64(sum(requests)) AS requests, toUInt64(sum(errors)) AS errors, \
         sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens, \
         sum(cached_input_tokens) AS cached_input_tokens, sum(cost_nanos) AS cost_nanos \
         FROM {db}.usage_windows FINAL WHERE granularity = '{g}' AND {cond} GROUP BY {list} \
         ORDER BY cost_nanos DESC, {list}",
        g = g.as_str(),
        cond = p.condition_on("window_start")
    )
}

/// Chargeback from the raw events (`usage_events FINAL`): any period, down to the second.
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

/// Cost per group of `dims` per UTC day or month of the period: from the rollup windows of
/// granularity `g` when given (they must tile the period and be no coarser than `step`), else
/// from the raw events.
pub fn chargeback_series(db: &str, dims: &[Dimension], p: &Period, step: Step, g: Option<Granularity>) -> String {
    let cols = key_columns(dims);
    let list = cols.join(", ");
    let (time, from, cond) = match g {
        Some(g) => (
            "window_start",
            format!("{db}.usage_windows FINAL"),
            format!("granularity = '{}' AND {}", g.as_str(), p.condition_on("window_start")),
        ),
        None => ("ended_at", format!("{db}.usage_events FINAL"), p.condition()),
    };
    let bucket = match step {
        Step::Day => format!("toString(toDate({time}, 'UTC'))"),
        Step::Month => format!("toString(toStartOfMonth({time}, 'UTC'))"),
    };
    format!(
        "SELECT {bucket} AS bucket, [{list}] AS keys, sum(cost_nanos) AS cost_nanos \
         FROM {from} WHERE {cond} GROUP BY bucket, {list} ORDER BY bucket, cost_nanos DESC, {list}"
    )
}

/// The outcome kinds with an outcome in the period, most outcomes first.
pub fn outcome_kinds(db: &str, p: &Period) -> String {
    format!(
        "SELECT kind FROM {db}.outcome_events FINAL WHERE {cond} GROUP BY kind ORDER BY count() DESC, kind",
        cond = p.condition_on("occurred_at")
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
         FROM {db}.usage_events FINAL WHERE {STUFFING_ROWS} AND {cond} GROUP BY workflow_tag ORDER BY workflow_tag",
        cond = p.condition()
    )
}

/// Session-hours above `k` × the p95 session-hour of their workflow (over the same period).
pub fn loops(db: &str, p: &Period, k: f64) -> String {
    format!(
        "SELECT workflow_tag, session_id, hour, requests, tokens, cost_nanos, workflow_p95_tokens FROM ( \
           SELECT workflow_tag, groupArray(session_id) AS sessions, groupArray(hour) AS hours, \
             groupArray(requests) AS requests_a, groupArray(tokens) AS tokens_a, groupArray(cost_nanos) AS cost_a, \
             toFloat64({p95}) AS workflow_p95_tokens \
           FROM ( \
             SELECT workflow_tag, session_id, toStartOfHour(ended_at, 'UTC') AS hour, count() AS requests, \
               sum({TOKENS}) AS tokens, sum(cost_nanos) AS cost_nanos \
             FROM {db}.usage_events FINAL WHERE {LOOP_ROWS} AND {cond} GROUP BY workflow_tag, session_id, hour \
             HAVING {SESSION_HOUR_HAS_TOKENS} \
           ) GROUP BY workflow_tag \
         ) ARRAY JOIN sessions AS session_id, hours AS hour, requests_a AS requests, tokens_a AS tokens, cost_a AS cost_nanos \
         WHERE tokens > {k:?} * workflow_p95_tokens \
         ORDER BY workflow_tag, session_id, hour",
        cond = p.condition(),
        p95 = measures::session_hour_quantile(0.95, "tokens"),
    )
}

pub fn drift(db: &str, p: &Period) -> String {
    format!(
        "SELECT provider, model, model_version, min(ended_at) AS first_seen, max(ended_at) AS last_seen, \
         count() AS requests, sum({PROMPT}) AS prompt_tokens, sum(assumeNotNull(reference_input_tokens)) AS reference_tokens \
         FROM {db}.usage_events FINAL \
         WHERE {DRIFT_ROWS} AND {cond} \
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

/// Cost per outcome of `kind` (a word, [`tollgate_schemas::outcome::valid_kind`]) grouped by
/// `group`'s column: outcomes that occurred in the period, usage that ended in it.
pub fn cost_per_outcome(db: &str, kind: &str, group: &str, p: &Period) -> String {
    use tollgate_schemas::outcome::sql::{Shape, cost_per_outcome};
    let literal = format!("'{kind}'");
    let outcome_cond = format!("kind = {literal} AND {}", p.condition_on("occurred_at"));
    let shape = Shape {
        group,
        outcome_bucket: "toUInt8(0)",
        usage_bucket: "toUInt8(0)",
        usage_kind: &literal,
        outcome_cond: &outcome_cond,
        usage_cond: &p.condition(),
    };
    format!("{} ORDER BY outcome_cost_nanos DESC, key", cost_per_outcome(db, &shape))
}
