//! Rebuilding the open windows at start, up to the per-partition offsets the meter has
//! checkpointed; the enforcer then consumes the usage topic from exactly those offsets, so
//! nothing is forgotten or counted twice across a restart.
//!
//! Rules that neither look at the session nor count in buckets finer than a minute are rebuilt
//! from the meter's minute rows of `usage_windows`, which hold each event once, at its first
//! copy, and are far fewer than the events; the others from the raw events, each event that
//! has a copy below the checkpoints once. A window row can cover events past the checkpoint
//! (the meter writes the windows, then the checkpoint): such rows are kept apart as
//! [`Covered`], and the events they cover are not counted again into those rules when they
//! are consumed. `tests/tests/enforcer_rebuild.rs` checks that both ways give the same counts.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use clickhouse::Client;
use clickhouse::Row;
use serde::Deserialize;
use tollgate_schemas::measures::{
    self, ATTEMPTED_ROWS, ATTEMPTED_WINDOW_REQUESTS, DRIFT_ROWS, SESSION_HOUR_HAS_TOKENS, STUFFING_ROWS,
};
use tollgate_schemas::policy::Policy;
use tollgate_schemas::rules::{Field, Rule, Scope, Window};
use tollgate_schemas::usage::sql::{PROMPT_TOKENS, TOTAL_TOKENS};
use tollgate_schemas::usage::{Envelope, UsageEvent};
use tollgate_store::rows::{Dims, Granularity, UsageRow};
use tollgate_store::tables::{EVENT_POSITIONS, SESSION_HOURS, USAGE_EVENTS, USAGE_WINDOWS};

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
    requests: i64,
    tokens: i64,
    cost: i64,
}

/// What the rollup query returns: minute rows wholly below the meter's checkpoints summed by
/// bucket and the rule dimensions (`above` 0, the row's other key columns empty), and each row
/// that covers events past them on its own (`above` 1, with its whole key and last offset).
#[derive(Debug, Row, Deserialize)]
struct RollupRow {
    project: String,
    team: String,
    user_id: String,
    cost_center: String,
    workflow_tag: String,
    environment: String,
    api_key_id: String,
    bucket: i64,
    above: u8,
    window_start: u32,
    virtual_model: String,
    provider: String,
    model: String,
    model_version: String,
    kafka_partition: i32,
    version: u64,
    requests: i64,
    tokens: i64,
    cost: i64,
}

/// What the rebuild read.
#[derive(Debug, Default, Clone, Copy)]
pub struct Rebuilt {
    /// Aggregated rows read from the raw events and from the rollups.
    pub raw_buckets: u64,
    pub rollup_buckets: u64,
    /// Requests counted from each.
    pub raw_requests: i64,
    pub rollup_requests: i64,
}

/// Where the rebuild reads each rule's usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The rollups for every rule [`from_rollups`] accepts, the raw events for the others.
    Best,
    /// The raw events for every rule (for comparing the two).
    Raw,
}

/// Whether a rule's counts can be rebuilt from the minute rows of `usage_windows`: they are
/// kept without the session, and a sliding window must count in whole minutes (calendar
/// windows are rebuilt by quarter-hour, which minutes make up).
pub fn from_rollups(rule: &Rule) -> bool {
    let minutes = match &rule.window {
        Window::Sliding { seconds } => bucket_seconds(*seconds) % 60 == 0,
        Window::Calendar { .. } => true,
    };
    !keyed_on_session(rule) && minutes
}

/// Whether a rule is scoped on the session or matches on it.
fn keyed_on_session(rule: &Rule) -> bool {
    rule.scope == Scope::Field(Field::SessionId) || rule.matchers.iter().any(|(f, _)| *f == Field::SessionId)
}

/// The time ranges to read for some rules: sliding windows need recent usage at a resolution that
/// divides each one's buckets, calendar windows everything since the earliest open period
/// started, at 15 minutes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Plan {
    /// On a quarter-hour.
    sliding_since_s: i64,
    sliding_bucket_s: i64,
    calendar_since_s: Option<i64>,
}

fn gcd(a: i64, b: i64) -> i64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

fn plan<'a>(rules: impl Iterator<Item = &'a Rule>, now_us: i64) -> Option<Plan> {
    let now_s = now_us / US;
    let mut longest = 0i64;
    let mut bucket = CALENDAR_BUCKET_S;
    let mut calendar_since: Option<i64> = None;
    let mut any = false;
    for rule in rules {
        any = true;
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
    let bucket = bucket.max(1);
    // On a quarter-hour (which `bucket` divides), so that the calendar range's last bucket ends
    // where the sliding range starts: a quarter-hour bucket straddling it would be counted at
    // its end, later than its events, into sliding windows they have left.
    let sliding_since_s = (now_s - longest).div_euclid(CALENDAR_BUCKET_S) * CALENDAR_BUCKET_S;
    any.then_some(Plan {
        sliding_since_s,
        sliding_bucket_s: bucket,
        calendar_since_s: calendar_since.filter(|c| *c < sliding_since_s),
    })
}

impl Plan {
    /// (from, to or unbounded, bucket) in seconds: the sliding range, then the calendar one.
    fn ranges(&self) -> Vec<(i64, Option<i64>, i64)> {
        let mut r = vec![(self.sliding_since_s, None, self.sliding_bucket_s)];
        if let Some(since) = self.calendar_since_s {
            r.push((since, Some(self.sliding_since_s), CALENDAR_BUCKET_S));
        }
        r
    }
}

/// The minute rows the rebuild read that cover events past the meter's checkpoint, each with the
/// last offset it covers: an event at or below it was counted by the rebuild into the rules
/// rebuilt from the rollups. Small (what the meter wrote between its windows and its
/// checkpoint), and forgotten as the consumer passes each row's offset.
#[derive(Debug, Default)]
pub struct Covered {
    rows: HashMap<(i32, u32, Dims), i64>,
}

impl Covered {
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether the rebuild counted `row`'s event (its first copy) into the rollup rules.
    pub fn counted(&self, row: &UsageRow) -> bool {
        let key = (row.kafka_partition, Granularity::Minute.start(row.ended_at), Dims::of(row));
        self.rows.get(&key).is_some_and(|last| row.kafka_offset <= *last)
    }

    /// Whether the rebuild counted `ev`, consumed at `at`, into the rollup rules. Asked when the
    /// event is consumed (before `passed` can forget its row), and kept with it while it waits.
    pub fn counted_event(&self, ev: &UsageEvent, at: (i32, i64)) -> bool {
        // Built only while rows are held: right after a start, until the consumer passes them.
        !self.is_empty() && self.counted(&UsageRow::new(ev.clone(), "", at.0, at.1))
    }

    /// Forgets the rows whose last offset the consumer has passed (`next`: the next offset of
    /// each partition).
    pub fn passed(&mut self, next: &BTreeMap<i32, i64>) {
        self.rows.retain(|(p, _, _), last| next.get(p).is_none_or(|n| *last >= *n));
    }
}

/// Counts the first copy of a consumed event into the engine: into every rule, or, when a row
/// the rebuild read covers it (`Covered::counted_event`, asked as it was consumed), only into
/// the rules rebuilt from the raw events.
pub fn observe_consumed(engine: &mut Engine, u: &Usage<'_>, counted_by_rebuild: bool, now_us: i64) {
    if counted_by_rebuild {
        engine.observe_rules(u, now_us, |r| !from_rollups(r));
    } else {
        engine.observe(u, now_us);
    }
}

/// Feeds the engine everything ClickHouse holds below `covered` (partition → next offset not yet
/// in the windows) that can still matter to an open window. Returns what it read, and the rows
/// that cover events past `covered`.
pub async fn rebuild(
    ch: &Client,
    topic: &str,
    covered: &BTreeMap<i32, i64>,
    engine: &mut Engine,
    now_us: i64,
    source: Source,
) -> Result<(Rebuilt, Covered), clickhouse::error::Error> {
    let mut rebuilt = Rebuilt::default();
    let mut above = Covered::default();
    if covered.is_empty() || engine.policy().rules.is_empty() {
        return Ok((rebuilt, above));
    }
    let policy = std::sync::Arc::clone(engine.policy());
    let limits = || policy.rules.iter().filter(|r| r.kind != tollgate_schemas::decision::RuleKind::Guard);
    let rolled = |r: &Rule| source == Source::Best && from_rollups(r);
    if let Some(p) = plan(limits().filter(|r| !rolled(r)), now_us) {
        // When every raw rule is keyed on the session, only events with one can count.
        let sessions_only = limits().filter(|r| !rolled(r)).all(keyed_on_session);
        for (from_s, to_s, bucket_s) in p.ranges() {
            let sql = raw_query(covered, from_s, to_s, bucket_s, sessions_only);
            let rows: Vec<Bucket> = ch.query(&sql).bind(topic).bind(topic).fetch_all().await?;
            for r in rows {
                rebuilt.raw_buckets += 1;
                rebuilt.raw_requests += r.requests;
                let env = Envelope {
                    project: opt(r.project),
                    team: opt(r.team),
                    user_id: opt(r.user_id),
                    session_id: opt(r.session_id),
                    workflow_tag: opt(r.workflow_tag),
                    environment: opt(r.environment),
                    cost_center: opt(r.cost_center),
                };
                let figures = (r.requests, r.tokens, r.cost);
                feed(engine, env, opt(r.api_key_id), r.bucket, bucket_s, figures, now_us, |rule| !rolled(rule));
            }
        }
    }
    if let Some(p) = plan(limits().filter(|r| rolled(r)), now_us) {
        for (from_s, to_s, bucket_s) in p.ranges() {
            // One query per range, so the rows below and past the checkpoints come from one
            // snapshot: with two, a row the meter rewrote in between would be in both or neither.
            let rows: Vec<RollupRow> = ch.query(&rollup_query(covered, from_s, to_s, bucket_s)).fetch_all().await?;
            for r in rows {
                rebuilt.rollup_buckets += 1;
                rebuilt.rollup_requests += r.requests;
                let env = Envelope {
                    project: opt(r.project.clone()),
                    team: opt(r.team.clone()),
                    user_id: opt(r.user_id.clone()),
                    session_id: None,
                    workflow_tag: opt(r.workflow_tag.clone()),
                    environment: opt(r.environment.clone()),
                    cost_center: opt(r.cost_center.clone()),
                };
                let figures = (r.requests, r.tokens, r.cost);
                feed(engine, env, opt(r.api_key_id.clone()), r.bucket, bucket_s, figures, now_us, rolled);
                if r.above == 1 {
                    let last = i64::try_from(r.version).unwrap_or(i64::MAX);
                    above.rows.insert((r.kafka_partition, r.window_start, r.dims()), last);
                }
            }
        }
    }
    Ok((rebuilt, above))
}

impl RollupRow {
    fn dims(self) -> Dims {
        Dims {
            project: self.project,
            team: self.team,
            user_id: self.user_id,
            cost_center: self.cost_center,
            workflow_tag: self.workflow_tag,
            environment: self.environment,
            api_key_id: self.api_key_id,
            virtual_model: self.virtual_model,
            provider: self.provider,
            model: self.model,
            model_version: self.model_version,
        }
    }
}

fn opt(s: String) -> Option<String> {
    if s.is_empty() { None } else { Some(s) }
}

/// Counts one aggregated row (requests, tokens, cost) of `bucket` into the rules `take` accepts.
#[allow(clippy::too_many_arguments)]
fn feed(
    engine: &mut Engine,
    envelope: Envelope,
    api_key_id: Option<String>,
    bucket: i64,
    bucket_s: i64,
    (requests, tokens, cost_nanos): (i64, i64, i64),
    now_us: i64,
    take: impl Fn(&Rule) -> bool,
) {
    let usage = Usage {
        // The bucket's last instant: a sliding window keeps it longest, it lies in the same
        // calendar period as every event of the bucket, and the bucket divides the rules'.
        at_us: (bucket + bucket_s) * US - 1,
        envelope: std::borrow::Cow::Owned(envelope),
        api_key_id: api_key_id.map(std::borrow::Cow::Owned),
        requests,
        tokens,
        cost_nanos,
    };
    engine.observe_rules(&usage, now_us, take);
}

/// Each event with a position below `covered` that meets `cond`, once: the events the meter has
/// counted by its checkpoints. Chosen through `event_positions`, which keeps every position the
/// meter read: `usage_events` keeps one copy of an event, the last inserted, which once merged
/// may lie past the checkpoints while the first lay below (the event was then counted nowhere).
/// The copies are the same event, so `FINAL`'s copy serves. The topic is both `?`s.
fn events_below(covered: &BTreeMap<i32, i64>, cond: &str) -> String {
    format!(
        "(SELECT * FROM {USAGE_EVENTS} FINAL WHERE kafka_topic = ? AND {cond} AND event_id IN \
         (SELECT event_id FROM {EVENT_POSITIONS} WHERE kafka_topic = ? AND ({offsets})))",
        offsets = tollgate_store::below_checkpoints(covered)
    )
}

fn time_range(column: &str, from: String, to: Option<String>) -> String {
    match to {
        Some(to) => format!("{column} >= {from} AND {column} < {to}"),
        None => format!("{column} >= {from}"),
    }
}

/// The raw rebuild query; the topic is bound, the numbers are formatted in (they are integers).
fn raw_query(
    covered: &BTreeMap<i32, i64>,
    from_s: i64,
    to_s: Option<i64>,
    bucket_s: i64,
    sessions_only: bool,
) -> String {
    let mut cond = format!(
        "{ATTEMPTED_ROWS} AND {}",
        time_range("ended_at_us", (from_s * US).to_string(), to_s.map(|t| (t * US).to_string()))
    );
    if sessions_only {
        cond.push_str(" AND session_id != ''");
    }
    format!(
        "SELECT project, team, user_id, session_id, workflow_tag, environment, cost_center, api_key_id, \
         toInt64(intDiv(ended_at_us, {bucket_us}) * {bucket_s}) AS bucket, toInt64(count()) AS requests, \
         sum({TOTAL_TOKENS}) AS tokens, sum(cost_nanos) AS cost \
         FROM {events} \
         GROUP BY project, team, user_id, session_id, workflow_tag, environment, cost_center, api_key_id, bucket",
        bucket_us = bucket_s * US,
        events = events_below(covered, &cond),
    )
}

/// The rollup rebuild query over the minute rows of `usage_windows` in a time range, for the
/// partitions the checkpoints name, each row at its latest version (`argMax` rather than
/// `FINAL`: with `FINAL`, a condition on `version` could be applied before the versions are
/// collapsed). A row wholly below its partition's checkpoint is summed by bucket and the
/// dimensions rules look at; a row that covers events at or past it (`above`) comes back alone,
/// with its whole key and last offset.
fn rollup_query(covered: &BTreeMap<i32, i64>, from_s: i64, to_s: Option<i64>, bucket_s: i64) -> String {
    let partitions = covered.keys().map(ToString::to_string).collect::<Vec<_>>().join(",");
    let mut next = String::from("multiIf(");
    for (p, n) in covered {
        let _ = write!(next, "kafka_partition = {p}, {n}, ");
    }
    next.push_str("0)");
    let range = time_range("window_start", format!("toDateTime({from_s})"), to_s.map(|t| format!("toDateTime({t})")));
    let alone = |column: &str, none: &str| format!("if(above = 1, {column}, {none}) AS {column}_");
    format!(
        "SELECT project, team, user_id, cost_center, workflow_tag, environment, api_key_id, bucket, above, \
         toUInt32(window_start_) AS window_start, virtual_model_ AS virtual_model, provider_ AS provider, \
         model_ AS model, model_version_ AS model_version, kafka_partition_ AS kafka_partition, v_ AS version, \
         sum(r) AS requests, sum(t) AS tokens, sum(c) AS cost FROM (\
         SELECT project, team, user_id, cost_center, workflow_tag, environment, api_key_id, \
         toInt64(intDiv(toUInt32(window_start), {bucket_s}) * {bucket_s}) AS bucket, \
         toUInt8(max(version) >= {next}) AS above, {ws}, {vm}, {pr}, {mo}, {mv}, {kp}, {v}, \
         argMax({ATTEMPTED_WINDOW_REQUESTS}, version) AS r, argMax({TOTAL_TOKENS}, version) AS t, \
         argMax(cost_nanos, version) AS c \
         FROM {USAGE_WINDOWS} WHERE granularity = 'minute' AND {range} AND kafka_partition IN ({partitions}) \
         GROUP BY window_start, project, team, user_id, cost_center, workflow_tag, environment, api_key_id, \
         virtual_model, provider, model, model_version, kafka_partition) \
         GROUP BY project, team, user_id, cost_center, workflow_tag, environment, api_key_id, bucket, above, \
         window_start_, virtual_model_, provider_, model_, model_version_, kafka_partition_, v_",
        ws = alone("window_start", "toDateTime(0)"),
        vm = alone("virtual_model", "''"),
        pr = alone("provider", "''"),
        mo = alone("model", "''"),
        mv = alone("model_version", "''"),
        kp = alone("kafka_partition", "toInt32(0)"),
        v = "if(above = 1, max(version), toUInt64(0)) AS v_",
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn demo() -> Policy {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../compose/policy");
        Policy::load_dir(&dir).unwrap()
    }

    #[test]
    fn the_demo_policy_reads_a_day_by_minute_and_the_month_by_quarter_hour() {
        let policy = demo();
        let now = 1_794_268_800 * US + 5 * 86_400 * US + 37 * US; // 2026-11-15, 37 s past midnight
        let p = plan(policy.rules.iter(), now).unwrap();
        assert_eq!(p.sliding_bucket_s, 60, "gcd of 60 (1h), 1440 (1d) and 900");
        assert_eq!(p.sliding_since_s, (now / US - 86_400 - 1_440) / 900 * 900, "on a quarter-hour");
        assert_eq!(p.calendar_since_s, Some(1_793_491_200), "2026-11-01T00:00Z");
        let sql = raw_query(&BTreeMap::from([(0, 10), (3, 7)]), 100, Some(200), 60, false);
        assert!(
            sql.contains("(kafka_partition = 0 AND kafka_offset < 10) OR (kafka_partition = 3 AND kafka_offset < 7)")
        );
        assert!(sql.contains("ended_at_us >= 100000000 AND ended_at_us < 200000000"));
        let sql = rollup_query(&BTreeMap::from([(0, 10), (3, 7)]), 120, None, 60);
        assert!(sql.contains("window_start >= toDateTime(120) AND kafka_partition IN (0,3)"), "{sql}");
        assert!(sql.contains("max(version) >= multiIf(kafka_partition = 0, 10, kafka_partition = 3, 7, 0)"), "{sql}");
    }

    #[test]
    fn session_rules_and_sub_minute_buckets_are_read_raw() {
        let policy = demo();
        let raw: Vec<&str> = policy.rules.iter().filter(|r| !from_rollups(r)).map(|r| r.id.as_str()).collect();
        assert!(raw.iter().all(|id| id.contains("session")), "{raw:?}");
        assert!(!raw.is_empty() && raw.len() < policy.rules.len(), "{raw:?}");
        let mut short = policy.rules.iter().find(|r| from_rollups(r)).unwrap().clone();
        short.window = Window::Sliding { seconds: 120 };
        assert!(!from_rollups(&short), "two-minute windows count in two-second buckets");
    }

    #[test]
    fn covered_rows_count_the_offsets_up_to_their_last_and_are_forgotten_once_passed() {
        let ev = tollgate_schemas::usage::UsageEvent::example("e".into(), None, 1_794_268_837 * US);
        let row = |offset| UsageRow::new(ev.clone(), "t", 2, offset);
        let mut c = Covered::default();
        let r = row(10);
        c.rows.insert((2, 1_794_268_800, Dims::of(&r)), 12);
        assert!(c.counted(&row(10)) && c.counted(&row(12)));
        assert!(!c.counted(&row(13)), "past the row's last offset");
        assert!(!c.counted(&UsageRow::new(ev.clone(), "t", 1, 5)), "another partition");
        c.passed(&BTreeMap::from([(2, 12)]));
        assert_eq!(c.len(), 1, "offset 12 not consumed yet");
        c.passed(&BTreeMap::from([(2, 13)]));
        assert!(c.is_empty());
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
        let rows: Vec<GuardRow> = ch.query(&q).bind(topic).bind(topic).fetch_all().await?;
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

/// The guards' three rebuild queries (the topic is each `?`).
fn guard_queries(covered: &BTreeMap<i32, i64>, lookback_s: i64, now_us: i64) -> [String; 3] {
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
    let from = |cond: String| format!("FROM {}", events_below(covered, &format!("{ATTEMPTED_ROWS} AND {cond}")));
    [
        // Loop guards: this hour per session (only session and workflow matter).
        format!(
            "SELECT session_id, workflow_tag, '' AS provider, '' AS model, '' AS model_version, max(ended_at_us) AS at_us, \
             toUInt64(0) AS requests, sum({TOTAL_TOKENS}) AS io_tokens, toInt64(0) AS prompt_tokens, \
             toUInt64(0) AS referenced_requests, toInt64(0) AS referenced_prompt_tokens, toInt64(0) AS reference_tokens, \
             toInt64(0) AS cost {from} GROUP BY session_id, workflow_tag",
            from = from(format!("ended_at_us >= {hour_us}")),
        ),
        // Context stuffing and frontier share: per workflow and model, by minute.
        format!(
            "SELECT '' AS session_id, workflow_tag, provider, model, '' AS model_version, \
             intDiv(ended_at_us, {bucket_us}) * {bucket_us} + {bucket_us} - 1 AS at_us, countIf({STUFFING_ROWS}) AS requests, \
             toInt64(0) AS io_tokens, sumIf({PROMPT_TOKENS}, {STUFFING_ROWS}) AS prompt_tokens, \
             toUInt64(0) AS referenced_requests, toInt64(0) AS referenced_prompt_tokens, toInt64(0) AS reference_tokens, \
             sum(cost_nanos) AS cost {from} GROUP BY workflow_tag, provider, model, at_us",
            from = from(format!("ended_at_us >= {recent_us}")),
        ),
        // Tokenizer drift: per model version, since it was first seen (30 days at most).
        format!(
            "SELECT {none_but_version}, model_version, min(ended_at_us) AS at_us, {sums} {from} \
             GROUP BY provider, model, model_version",
            none_but_version = "'' AS session_id, '' AS workflow_tag, provider, model",
            from = from(format!("model_version != '' AND ended_at_us >= {}", now_us - 30 * 86_400 * US)),
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
    let Some(p) = plan(policy.rules.iter(), now_us) else { return Vec::new() };
    let mut out = vec![
        raw_query(&covered, p.sliding_since_s, None, p.sliding_bucket_s, true),
        raw_query(&covered, p.calendar_since_s.unwrap_or(0), Some(p.sliding_since_s), CALENDAR_BUCKET_S, false),
        rollup_query(&covered, p.sliding_since_s, None, p.sliding_bucket_s),
    ];
    out.extend(guard_queries(&covered, 86_400, now_us));
    let quoted = format!("'{}'", topic.replace('\'', ""));
    let mut out: Vec<String> = out.into_iter().map(|q| q.replace('?', &quoted)).collect();
    out.push(baseline_query(95, 7, now_us));
    out
}
