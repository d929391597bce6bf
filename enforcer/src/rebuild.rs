//! Rebuilding the open windows at start: the usage ClickHouse already holds, up to the per-partition
//! offsets the meter has checkpointed, summed per time bucket and rule dimensions. The enforcer
//! then consumes the usage topic from exactly those offsets, so nothing is forgotten or counted
//! twice across a restart.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use clickhouse::Client;
use clickhouse::Row;
use serde::Deserialize;
use tollgate_schemas::measures::{self, DRIFT_ROWS, SESSION_HOUR_HAS_TOKENS, STUFFING_ROWS};
use tollgate_schemas::policy::Policy;
use tollgate_schemas::rules::Window;
use tollgate_schemas::usage::Envelope;
use tollgate_schemas::usage::sql::{PROMPT_TOKENS, TOTAL_TOKENS};
use tollgate_store::tables::{SESSION_HOURS, USAGE_EVENTS};

use crate::engine::{Engine, Usage};
use tollgate_schemas::window::{Counter, bucket_seconds};

const US: i64 = 1_000_000;
/// Every time zone's offset is a multiple of 15 minutes, so 15-minute buckets never straddle the
/// start of a calendar day, week or month.
const CALENDAR_BUCKET_S: i64 = 900;

#[derive(Debug, Row, Deserialize)]
struct Bucket {
    project: String,
    team: String,
    user_id: String,
    session_id: String,
    workflow_tag: String,
    environment: String,
    cost_center: String,
    api_key_id: String,
    bucket: i64,
    requests: u64,
    tokens: i64,
    cost: i64,
}

/// What the rebuild read.
#[derive(Debug, Default, Clone, Copy)]
pub struct Rebuilt {
    pub buckets: u64,
    pub requests: u64,
}

/// The time ranges to read: sliding windows need recent usage at their bucket resolution, calendar
/// windows everything since the earliest open period started, at 15 minutes.
struct Plan {
    sliding_since_s: i64,
    sliding_bucket_s: i64,
    calendar_since_s: Option<i64>,
}

fn gcd(a: i64, b: i64) -> i64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

fn plan(policy: &Policy, now_us: i64) -> Plan {
    let now_s = now_us / US;
    let mut longest = 0i64;
    let mut bucket = CALENDAR_BUCKET_S;
    let mut calendar_since: Option<i64> = None;
    for rule in &policy.rules {
        match &rule.window {
            Window::Sliding { seconds } => {
                let b = bucket_seconds(*seconds);
                longest = longest.max(i64::try_from(*seconds).unwrap_or(i64::MAX / US) + b);
                bucket = gcd(bucket, b);
            }
            Window::Calendar { .. } => {
                let start = Counter::new(&rule.window).bounds(now_us).0 / US;
                calendar_since = Some(calendar_since.map_or(start, |c: i64| c.min(start)));
            }
        }
    }
    let sliding_since_s = now_s - longest;
    Plan {
        sliding_since_s,
        sliding_bucket_s: bucket.max(1),
        calendar_since_s: calendar_since.filter(|c| *c < sliding_since_s),
    }
}

/// Feeds the engine everything ClickHouse holds below `covered` (partition → next offset not yet
/// in ClickHouse) that can still matter to an open window.
pub async fn rebuild(
    ch: &Client,
    topic: &str,
    covered: &BTreeMap<i32, i64>,
    engine: &mut Engine,
    now_us: i64,
) -> Result<Rebuilt, clickhouse::error::Error> {
    if covered.is_empty() || engine.policy().rules.is_empty() {
        return Ok(Rebuilt::default());
    }
    let p = plan(engine.policy(), now_us);
    let mut ranges = vec![(p.sliding_since_s, now_us / US + 1, p.sliding_bucket_s)];
    if let Some(since) = p.calendar_since_s {
        ranges.push((since, p.sliding_since_s, CALENDAR_BUCKET_S));
    }
    let mut rebuilt = Rebuilt::default();
    for (from_s, to_s, bucket_s) in ranges {
        let rows: Vec<Bucket> = ch.query(&query(covered, from_s, to_s, bucket_s)).bind(topic).fetch_all().await?;
        for r in rows {
            let opt = |s: String| if s.is_empty() { None } else { Some(s) };
            let usage = Usage {
                // The bucket's last instant: a sliding window keeps it longest, and it lies in the
                // same calendar period as every event of the bucket.
                at_us: (r.bucket + bucket_s) * US - 1,
                envelope: Envelope {
                    project: opt(r.project),
                    team: opt(r.team),
                    user_id: opt(r.user_id),
                    session_id: opt(r.session_id),
                    workflow_tag: opt(r.workflow_tag),
                    environment: opt(r.environment),
                    cost_center: opt(r.cost_center),
                },
                api_key_id: opt(r.api_key_id),
                requests: i64::try_from(r.requests).unwrap_or(i64::MAX),
                tokens: r.tokens,
                cost_nanos: r.cost,
            };
            engine.observe(&usage, now_us);
            rebuilt.buckets += 1;
            rebuilt.requests += r.requests;
        }
    }
    Ok(rebuilt)
}

/// `(kafka_partition = 0 AND kafka_offset < 10) OR …`: the rows the meter's checkpoints cover.
fn covered_filter(covered: &BTreeMap<i32, i64>) -> String {
    let mut offsets = String::new();
    for (i, (p, next)) in covered.iter().enumerate() {
        if i > 0 {
            offsets.push_str(" OR ");
        }
        let _ = write!(offsets, "(kafka_partition = {p} AND kafka_offset < {next})");
    }
    offsets
}

/// One aggregate query; the topic is bound, the numbers are formatted in (they are integers).
fn query(covered: &BTreeMap<i32, i64>, from_s: i64, to_s: i64, bucket_s: i64) -> String {
    let offsets = covered_filter(covered);
    format!(
        "SELECT project, team, user_id, session_id, workflow_tag, environment, cost_center, api_key_id, \
         intDiv(ended_at_us, {bucket_us}) * {bucket_s} AS bucket, count() AS requests, \
         sum({TOTAL_TOKENS}) AS tokens, \
         sum(cost_nanos) AS cost \
         FROM {USAGE_EVENTS} FINAL \
         WHERE kafka_topic = ? AND ended_at_us >= {from_us} AND ended_at_us < {to_us} \
         AND status != 'rejected' AND ({offsets}) \
         GROUP BY project, team, user_id, session_id, workflow_tag, environment, cost_center, api_key_id, bucket",
        bucket_us = bucket_s * US,
        from_us = from_s * US,
        to_us = to_s * US,
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_demo_policy_reads_a_day_by_minute_and_the_month_by_quarter_hour() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../compose/policy");
        let policy = Policy::load_dir(&dir).unwrap();
        let now = 1_794_268_800 * US + 5 * 86_400 * US; // 2026-11-15
        let p = plan(&policy, now);
        assert_eq!(p.sliding_bucket_s, 60, "gcd of 60 (1h), 1440 (1d) and 900");
        assert_eq!(p.sliding_since_s, now / US - 86_400 - 1_440);
        assert_eq!(p.calendar_since_s, Some(1_793_491_200), "2026-11-01T00:00Z");
        let sql = query(&BTreeMap::from([(0, 10), (3, 7)]), 100, 200, 60);
        assert!(
            sql.contains("(kafka_partition = 0 AND kafka_offset < 10) OR (kafka_partition = 3 AND kafka_offset < 7)")
        );
        assert!(sql.contains("ended_at_us >= 100000000 AND ended_at_us < 200000000"));
    }
}

#[derive(Debug, Row, Deserialize)]
struct GuardRow {
    session_id: String,
    workflow_tag: String,
    provider: String,
    model: String,
    model_version: String,
    at_us: i64,
    requests: u64,
    io_tokens: i64,
    prompt_tokens: i64,
    referenced_requests: u64,
    referenced_prompt_tokens: i64,
    reference_tokens: i64,
    cost: i64,
}

/// Feeds the anomaly guards what ClickHouse holds below `covered`: this hour's session totals
/// (loop guards), recent spend and prompt sizes per workflow and model (context stuffing,
/// frontier share), and per model version the last 30 days' token ratios (tokenizer drift).
pub async fn rebuild_guards(
    ch: &Client,
    topic: &str,
    covered: &BTreeMap<i32, i64>,
    guards: &mut crate::guards::Guards,
    now_us: i64,
) -> Result<u64, clickhouse::error::Error> {
    if covered.is_empty() || guards.is_empty() {
        return Ok(0);
    }
    let mut rows_read = 0u64;
    for q in guard_queries(covered, guards.lookback_s(), now_us) {
        let rows: Vec<GuardRow> = ch.query(&q).bind(topic).fetch_all().await?;
        for r in rows {
            rows_read += 1;
            let (requests, referenced) = (r.requests as i64, r.referenced_requests as i64);
            // Drift rows carry everything; the others only what their guard reads.
            let s = crate::guards::Sample {
                at_us: r.at_us,
                session_id: r.session_id,
                workflow: r.workflow_tag,
                provider: r.provider,
                model: r.model,
                model_version: r.model_version,
                requests: if referenced > 0 { 0 } else { requests },
                io_tokens: if referenced > 0 { 0 } else { r.io_tokens },
                prompt_tokens: r.prompt_tokens,
                referenced_requests: referenced,
                referenced_prompt_tokens: r.referenced_prompt_tokens,
                reference_tokens: r.reference_tokens,
                cost_nanos: if referenced > 0 { 0 } else { r.cost },
            };
            guards.observe(&s, now_us);
        }
    }
    Ok(rows_read)
}

/// The guards' three rebuild queries (the topic is the one `?`).
fn guard_queries(covered: &BTreeMap<i32, i64>, lookback_s: i64, now_us: i64) -> [String; 3] {
    let offsets = covered_filter(covered);
    let hour_us = now_us / (3600 * US) * 3600 * US;
    let recent_us = now_us - lookback_s.min(86_400 * 7) * US;
    let bucket_us = 60 * US;
    // Each measure's rows as `measures` defines them (as `guards::Sample::of` does, event by event).
    let sums = format!(
        "countIf({STUFFING_ROWS}) AS requests, sum({TOTAL_TOKENS}) AS io_tokens, \
         sumIf({PROMPT_TOKENS}, {STUFFING_ROWS}) AS prompt_tokens, \
         countIf({DRIFT_ROWS}) AS referenced_requests, \
         sumIf({PROMPT_TOKENS}, {DRIFT_ROWS}) AS referenced_prompt_tokens, \
         sumIf(ifNull(reference_input_tokens, 0), {DRIFT_ROWS}) AS reference_tokens, sum(cost_nanos) AS cost"
    );
    let from = format!("FROM {USAGE_EVENTS} FINAL WHERE kafka_topic = ? AND status != 'rejected' AND ({offsets})");
    [
        // Loop guards: this hour per session (only session and workflow matter).
        format!(
            "SELECT session_id, workflow_tag, '' AS provider, '' AS model, '' AS model_version, max(ended_at_us) AS at_us, \
             toUInt64(0) AS requests, sum({TOTAL_TOKENS}) AS io_tokens, toInt64(0) AS prompt_tokens, \
             toUInt64(0) AS referenced_requests, toInt64(0) AS referenced_prompt_tokens, toInt64(0) AS reference_tokens, \
             toInt64(0) AS cost {from} AND ended_at_us >= {hour_us} GROUP BY session_id, workflow_tag"
        ),
        // Context stuffing and frontier share: per workflow and model, by minute.
        format!(
            "SELECT '' AS session_id, workflow_tag, provider, model, '' AS model_version, \
             intDiv(ended_at_us, {bucket_us}) * {bucket_us} + {bucket_us} - 1 AS at_us, countIf({STUFFING_ROWS}) AS requests, \
             toInt64(0) AS io_tokens, sumIf({PROMPT_TOKENS}, {STUFFING_ROWS}) AS prompt_tokens, \
             toUInt64(0) AS referenced_requests, toInt64(0) AS referenced_prompt_tokens, toInt64(0) AS reference_tokens, \
             sum(cost_nanos) AS cost {from} AND ended_at_us >= {recent_us} GROUP BY workflow_tag, provider, model, at_us"
        ),
        // Tokenizer drift: per model version, since it was first seen (30 days at most).
        format!(
            "SELECT {none_but_version}, model_version, min(ended_at_us) AS at_us, {sums} {from} \
             AND model_version != '' AND ended_at_us >= {month_us} GROUP BY provider, model, model_version",
            none_but_version = "'' AS session_id, '' AS workflow_tag, provider, model",
            month_us = now_us - 30 * 86_400 * US,
        ),
    ]
}

/// Per workflow, the `percentile` of its session-hours' tokens over the last `days` full hours,
/// and how many session-hours that is, from the meter's `session_hours`.
pub async fn loop_baseline(
    ch: &Client,
    percentile: u32,
    days: u32,
    now_us: i64,
) -> Result<crate::guards::Baseline, clickhouse::error::Error> {
    let rows: Vec<(String, i64, u64)> = ch.query(&baseline_query(percentile, days, now_us)).fetch_all().await?;
    Ok(rows.into_iter().map(|(w, p, n)| (w, (p, n))).collect())
}

fn baseline_query(percentile: u32, days: u32, now_us: i64) -> String {
    let this_hour = now_us / (3600 * US) * 3600;
    let since = this_hour - i64::from(days) * 86_400;
    format!(
        "SELECT workflow_tag, toInt64({quantile}) AS p, count() AS n FROM (\
         SELECT hour, workflow_tag, session_id, sum({TOTAL_TOKENS}) AS tokens FROM {SESSION_HOURS} FINAL \
         WHERE hour >= toDateTime({since}) AND hour < toDateTime({this_hour}) GROUP BY hour, workflow_tag, session_id \
         HAVING {SESSION_HOUR_HAS_TOKENS}) \
         GROUP BY workflow_tag",
        quantile = measures::session_hour_quantile(f64::from(percentile.clamp(1, 100)) / 100.0, "tokens"),
    )
}

/// Every query the enforcer runs at start, with `topic` in place of the bound parameter: for
/// checking them on another ClickHouse (the tests run them on current ClickHouse through chdb).
pub fn startup_sql(policy: &Policy, topic: &str, now_us: i64) -> Vec<String> {
    let covered = BTreeMap::from([(0, 100), (1, 7)]);
    let p = plan(policy, now_us);
    let mut out = vec![query(&covered, p.sliding_since_s, now_us / US, p.sliding_bucket_s)];
    out.extend(guard_queries(&covered, 86_400, now_us));
    let quoted = format!("'{}'", topic.replace('\'', ""));
    let mut out: Vec<String> = out.into_iter().map(|q| q.replacen('?', &quoted, 1)).collect();
    out.push(baseline_query(95, 7, now_us));
    out
}
