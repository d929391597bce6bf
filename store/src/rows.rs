//! The rows written to ClickHouse, one type per table: `usage_events`, `usage_windows`,
//! `session_hours`, `meter_checkpoints`, `breach_history`, `alert_history` and `outcome_events`. The meter writes
//! them; the enforcer and the reports read the tables.

use clickhouse::Row;
use serde::{Deserialize, Serialize};
use tollgate_schemas::decision::{Alert, BreachDecision};
use tollgate_schemas::outcome::Outcome;
use tollgate_schemas::usage::UsageEvent;

/// One row of `usage_events` (every column but `inserted_at`, which defaults to now()).
#[derive(Debug, Clone, Row, Serialize)]
pub struct UsageRow {
    pub event_id: String,
    pub started_at: u32,
    pub started_at_us: i64,
    pub first_token_at_us: Option<i64>,
    pub ended_at: u32,
    pub ended_at_us: i64,
    pub project: String,
    pub team: String,
    pub user_id: String,
    pub session_id: String,
    pub workflow_tag: String,
    pub environment: String,
    pub cost_center: String,
    pub api_key_id: String,
    pub api_format: &'static str,
    pub virtual_model: String,
    pub provider: String,
    pub model: String,
    pub model_version: String,
    pub attempt: i32,
    pub fallback_path: Vec<String>,
    pub status: &'static str,
    pub http_status: i32,
    pub error: String,
    pub streamed: u8,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cached_input_tokens: i64,
    pub cache_write_tokens: i64,
    pub reasoning_tokens: i64,
    pub reference_input_tokens: Option<i64>,
    pub input_chars: i64,
    pub token_source: &'static str,
    pub cost_nanos: i64,
    pub price_card_version: String,
    pub decision_rule_id: String,
    pub decision_scope: String,
    pub decision_action: String,
    pub decision_version: i64,
    pub trace_id: String,
    pub kafka_topic: String,
    pub kafka_partition: i32,
    pub kafka_offset: i64,
}

fn secs(us: i64) -> u32 {
    u32::try_from(us.div_euclid(1_000_000)).unwrap_or(0)
}

impl UsageRow {
    pub fn new(ev: UsageEvent, topic: &str, partition: i32, offset: i64) -> Self {
        let e = ev.envelope;
        let d = ev.decision;
        UsageRow {
            started_at: secs(ev.started_at_us),
            ended_at: secs(ev.ended_at_us),
            event_id: ev.event_id,
            started_at_us: ev.started_at_us,
            first_token_at_us: ev.first_token_at_us,
            ended_at_us: ev.ended_at_us,
            project: e.project.unwrap_or_default(),
            team: e.team.unwrap_or_default(),
            user_id: e.user_id.unwrap_or_default(),
            session_id: e.session_id.unwrap_or_default(),
            workflow_tag: e.workflow_tag.unwrap_or_default(),
            environment: e.environment.unwrap_or_default(),
            cost_center: e.cost_center.unwrap_or_default(),
            api_key_id: ev.api_key_id.unwrap_or_default(),
            api_format: ev.api_format.as_str(),
            virtual_model: ev.virtual_model,
            provider: ev.provider,
            model: ev.model,
            model_version: ev.model_version.unwrap_or_default(),
            attempt: ev.attempt,
            fallback_path: ev.fallback_path,
            status: ev.status.as_str(),
            http_status: ev.http_status,
            error: ev.error.unwrap_or_default(),
            streamed: u8::from(ev.streamed),
            input_tokens: ev.input_tokens,
            output_tokens: ev.output_tokens,
            cached_input_tokens: ev.cached_input_tokens,
            cache_write_tokens: ev.cache_write_tokens,
            reasoning_tokens: ev.reasoning_tokens,
            reference_input_tokens: ev.reference_input_tokens,
            input_chars: ev.input_chars,
            token_source: ev.token_source.as_str(),
            cost_nanos: ev.cost_nanos,
            price_card_version: ev.price_card_version,
            decision_rule_id: d.as_ref().map(|d| d.rule_id.clone()).unwrap_or_default(),
            decision_scope: d.as_ref().map(|d| d.scope.clone()).unwrap_or_default(),
            decision_action: d.as_ref().map(|d| d.action.clone()).unwrap_or_default(),
            decision_version: d.map_or(0, |d| d.version),
            trace_id: ev.trace_id.unwrap_or_default(),
            kafka_topic: topic.to_owned(),
            kafka_partition: partition,
            kafka_offset: offset,
        }
    }
}

/// The `granularity` of a `usage_windows` row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Granularity {
    Minute,
    Hour,
    Day,
    Month,
}

impl Granularity {
    pub const ALL: [Granularity; 4] = [Granularity::Minute, Granularity::Hour, Granularity::Day, Granularity::Month];

    pub fn as_str(self) -> &'static str {
        match self {
            Granularity::Minute => "minute",
            Granularity::Hour => "hour",
            Granularity::Day => "day",
            Granularity::Month => "month",
        }
    }

    /// End of the window that starts at `start` (the next one's start).
    pub fn end(self, start: u32) -> u32 {
        match self {
            Granularity::Minute => start.saturating_add(60),
            Granularity::Hour => start.saturating_add(3600),
            Granularity::Day => start.saturating_add(86_400),
            // 31 days on is always inside the next month; its start is this month's end.
            Granularity::Month => Granularity::Month.start(start.saturating_add(31 * 86_400)),
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|g| g.as_str() == s)
    }

    /// Start of the window holding `t` (UTC seconds), as ClickHouse's `toStartOfMinute`,
    /// `toStartOfHour`, `toStartOfDay` and `toStartOfMonth` compute it.
    pub fn start(self, t: u32) -> u32 {
        match self {
            Granularity::Minute => t - t % 60,
            Granularity::Hour => t - t % 3600,
            Granularity::Day => t - t % 86_400,
            Granularity::Month => {
                let (y, m, _) = civil_from_days(i64::from(t / 86_400));
                u32::try_from(days_from_civil(y, m, 1) * 86_400).unwrap_or(0)
            }
        }
    }
}

// Howard Hinnant's civil-calendar algorithms (public domain): days since 1970-01-01 <-> date.
// Written here because the month boundary is the only calendar arithmetic the rollups need.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// One row of `usage_windows`.
#[derive(Debug, Clone, PartialEq, Eq, Row, Serialize, Deserialize)]
pub struct WindowRow {
    pub granularity: String,
    pub window_start: u32,
    pub project: String,
    pub team: String,
    pub user_id: String,
    pub cost_center: String,
    pub workflow_tag: String,
    pub environment: String,
    pub api_key_id: String,
    pub virtual_model: String,
    pub provider: String,
    pub model: String,
    pub model_version: String,
    pub kafka_partition: i32,
    pub requests: i64,
    pub errors: i64,
    /// Of `requests`, those Tollgate refused.
    pub rejected: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cached_input_tokens: i64,
    pub cache_write_tokens: i64,
    pub reasoning_tokens: i64,
    pub cost_nanos: i64,
    pub latency_us_sum: i64,
    pub version: u64,
}

/// The dimensions a `usage_windows` row is kept by (with its granularity, start and partition).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Dims {
    pub project: String,
    pub team: String,
    pub user_id: String,
    pub cost_center: String,
    pub workflow_tag: String,
    pub environment: String,
    pub api_key_id: String,
    pub virtual_model: String,
    pub provider: String,
    pub model: String,
    pub model_version: String,
}

impl Dims {
    /// A raw row's window dimensions.
    pub fn of(r: &UsageRow) -> Self {
        Dims {
            project: r.project.clone(),
            team: r.team.clone(),
            user_id: r.user_id.clone(),
            cost_center: r.cost_center.clone(),
            workflow_tag: r.workflow_tag.clone(),
            environment: r.environment.clone(),
            api_key_id: r.api_key_id.clone(),
            virtual_model: r.virtual_model.clone(),
            provider: r.provider.clone(),
            model: r.model.clone(),
            model_version: r.model_version.clone(),
        }
    }
}

/// One row of `session_hours`.
#[derive(Debug, Clone, PartialEq, Eq, Row, Serialize, Deserialize)]
pub struct SessionRow {
    pub hour: u32,
    pub workflow_tag: String,
    pub session_id: String,
    pub project: String,
    pub team: String,
    pub user_id: String,
    pub kafka_partition: i32,
    pub requests: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cost_nanos: i64,
    pub version: u64,
}

#[derive(Debug, Clone, Row, Serialize)]
pub struct CheckpointRow {
    pub topic: String,
    pub kafka_partition: i32,
    pub next_offset: u64,
}

/// One row of `breach_history`: a breach decision and where it was read.
#[derive(Debug, Clone, Row, Serialize)]
pub struct BreachRow {
    rule_id: String,
    rule_kind: &'static str,
    scope: String,
    state: &'static str,
    action: String,
    audit: u8,
    cut_streams: u8,
    measure: &'static str,
    limit_value: i64,
    observed: i64,
    headroom: i64,
    window_start_us: i64,
    window_end_us: i64,
    decided_at: u32,
    decided_at_us: i64,
    version: i64,
    kafka_topic: String,
    kafka_partition: i32,
    kafka_offset: i64,
}

impl BreachRow {
    pub fn new(d: BreachDecision, topic: &str, partition: i32, offset: i64) -> Self {
        BreachRow {
            rule_kind: d.rule_kind.as_str(),
            state: d.state.as_str(),
            audit: u8::from(d.audit),
            cut_streams: u8::from(d.cut_streams),
            measure: d.measure.as_str(),
            limit_value: d.limit,
            observed: d.observed,
            headroom: d.headroom,
            window_start_us: d.window_start_us,
            window_end_us: d.window_end_us,
            decided_at: secs(d.decided_at_us),
            decided_at_us: d.decided_at_us,
            version: d.version,
            rule_id: d.rule_id,
            scope: d.scope,
            action: d.action,
            kafka_topic: topic.to_owned(),
            kafka_partition: partition,
            kafka_offset: offset,
        }
    }
}

/// One row of `alert_history`: an alert and where it was read.
#[derive(Debug, Clone, Row, Serialize)]
pub struct AlertRow {
    alert_id: String,
    rule_id: String,
    kind: &'static str,
    severity: &'static str,
    scope: String,
    threshold_pct: i32,
    measure: &'static str,
    limit_value: i64,
    observed: i64,
    window_start_us: i64,
    window_end_us: i64,
    raised_at: u32,
    raised_at_us: i64,
    summary: String,
    notify: Vec<String>,
    kafka_topic: String,
    kafka_partition: i32,
    kafka_offset: i64,
}

impl AlertRow {
    pub fn new(a: Alert, topic: &str, partition: i32, offset: i64) -> Self {
        AlertRow {
            kind: a.kind.as_str(),
            severity: a.severity.as_str(),
            threshold_pct: a.threshold_pct,
            measure: a.measure.as_str(),
            limit_value: a.limit,
            observed: a.observed,
            window_start_us: a.window_start_us,
            window_end_us: a.window_end_us,
            raised_at: secs(a.raised_at_us),
            raised_at_us: a.raised_at_us,
            alert_id: a.alert_id,
            rule_id: a.rule_id,
            scope: a.scope,
            summary: a.summary,
            notify: a.notify,
            kafka_topic: topic.to_owned(),
            kafka_partition: partition,
            kafka_offset: offset,
        }
    }
}

/// One row of `outcome_events`: an outcome as the meter read it, with its Kafka position.
#[derive(Debug, Clone, Row, Serialize)]
pub struct OutcomeRow {
    outcome_id: String,
    kind: String,
    value: Option<f64>,
    occurred_at: u32,
    occurred_at_us: i64,
    received_at_us: i64,
    project: String,
    team: String,
    user_id: String,
    session_id: String,
    workflow_tag: String,
    environment: String,
    cost_center: String,
    api_key_id: String,
    session_ids: Vec<String>,
    trace_ids: Vec<String>,
    kafka_topic: String,
    kafka_partition: i32,
    kafka_offset: i64,
}

impl OutcomeRow {
    pub fn new(o: Outcome, topic: &str, partition: i32, offset: i64) -> Self {
        let e = o.envelope;
        OutcomeRow {
            outcome_id: o.outcome_id,
            kind: o.kind,
            value: o.value,
            occurred_at: secs(o.occurred_at_us),
            occurred_at_us: o.occurred_at_us,
            received_at_us: o.received_at_us,
            project: e.project.unwrap_or_default(),
            team: e.team.unwrap_or_default(),
            user_id: e.user_id.unwrap_or_default(),
            session_id: e.session_id.unwrap_or_default(),
            workflow_tag: e.workflow_tag.unwrap_or_default(),
            environment: e.environment.unwrap_or_default(),
            cost_center: e.cost_center.unwrap_or_default(),
            api_key_id: o.api_key_id.unwrap_or_default(),
            session_ids: o.session_ids,
            trace_ids: o.trace_ids,
            kafka_topic: topic.to_owned(),
            kafka_partition: partition,
            kafka_offset: offset,
        }
    }
}

/// One row of `event_positions`: where the meter read a copy of an event. Borrowed from its
/// `UsageRow`, to be written as it is made (`insert_positions`).
#[derive(Debug, Clone, Row, Serialize)]
pub struct PositionRow<'a> {
    pub event_id: &'a str,
    pub kafka_topic: &'a str,
    pub kafka_partition: i32,
    pub kafka_offset: i64,
    pub ended_at: u32,
}

impl<'a> PositionRow<'a> {
    pub fn of(r: &'a UsageRow) -> Self {
        PositionRow {
            event_id: &r.event_id,
            kafka_topic: &r.kafka_topic,
            kafka_partition: r.kafka_partition,
            kafka_offset: r.kafka_offset,
            ended_at: r.ended_at,
        }
    }
}
