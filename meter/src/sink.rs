//! Writes usage rows to ClickHouse and reads back the Kafka positions it already holds.

use std::collections::{BTreeMap, BTreeSet};

use clickhouse::{Client, Row};
use serde::Serialize;
use tollgate_schemas::usage::UsageEvent;

use crate::window::{Missing, SessionRow, WindowRow};

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
            token_source: match ev.token_source {
                tollgate_schemas::usage::TokenSource::Provider => "provider",
                tollgate_schemas::usage::TokenSource::Estimated => "estimated",
            },
            cost_nanos: ev.cost_nanos,
            price_card_version: ev.price_card_version,
            decision_rule_id: d.as_ref().map(|d| d.rule_id.clone()).unwrap_or_default(),
            decision_scope: d.as_ref().map(|d| d.scope.clone()).unwrap_or_default(),
            decision_action: d.as_ref().map(|d| d.action.clone()).unwrap_or_default(),
            decision_version: d.map_or(0, |d| d.version),
            kafka_topic: topic.to_owned(),
            kafka_partition: partition,
            kafka_offset: offset,
        }
    }
}

/// Inserts one batch of raw usage rows as one INSERT (one block per month partition).
pub async fn insert(client: &Client, rows: &[UsageRow]) -> Result<(), clickhouse::error::Error> {
    insert_rows(client, "usage_events", rows).await
}

/// How long one chunk of an INSERT may take to reach the socket.
const INSERT_SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// How long the server may take to answer an INSERT once all rows are sent.
const INSERT_END_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// Inserts rows of any `Row` type into `table` as one INSERT.
pub async fn insert_rows<T>(client: &Client, table: &str, rows: &[T]) -> Result<(), clickhouse::error::Error>
where
    T: Serialize + for<'a> Row<Value<'a> = T>,
{
    if rows.is_empty() {
        return Ok(());
    }
    // A server that stops answering mid-INSERT must become an error the caller retries, not a
    // wait without end; re-sending a batch is safe (ReplacingMergeTree, read with FINAL).
    let mut insert =
        client.insert::<T>(table).await?.with_timeouts(Some(INSERT_SEND_TIMEOUT), Some(INSERT_END_TIMEOUT));
    for r in rows {
        insert.write(r).await?;
    }
    insert.end().await
}

/// The current rows of the windows and session-hours `missing` names.
pub async fn load_windows(
    client: &Client,
    missing: &Missing,
) -> Result<(Vec<WindowRow>, Vec<SessionRow>), clickhouse::error::Error> {
    // One IN-set condition per granularity (on the primary key), not one OR term per window:
    // a superset of the rows asked for, which `Windows::load` keeps only where absent.
    let mut windows = Vec::new();
    let mut by_granularity: BTreeMap<&'static str, (BTreeSet<u32>, BTreeSet<i32>)> = BTreeMap::new();
    for (g, start, p) in &missing.windows {
        let e = by_granularity.entry(g.as_str()).or_default();
        e.0.insert(*start);
        e.1.insert(*p);
    }
    if !by_granularity.is_empty() {
        let cond = by_granularity
            .iter()
            .map(|(g, (starts, parts))| {
                format!(
                    "(granularity = '{g}' AND window_start IN ({}) AND kafka_partition IN ({}))",
                    join(starts.iter().map(|s| format!("toDateTime({s})"))),
                    join(parts.iter())
                )
            })
            .collect::<Vec<_>>()
            .join(" OR ");
        windows = client
            .query(&format!("SELECT ?fields FROM usage_windows FINAL WHERE {cond}"))
            .fetch_all::<WindowRow>()
            .await?;
    }
    let mut sessions = Vec::new();
    let hours: BTreeSet<u32> = missing.sessions.iter().map(|(h, _)| *h).collect();
    let parts: BTreeSet<i32> = missing.sessions.iter().map(|(_, p)| *p).collect();
    if !hours.is_empty() {
        sessions = client
            .query(&format!(
                "SELECT ?fields FROM session_hours FINAL WHERE hour IN ({}) AND kafka_partition IN ({})",
                join(hours.iter().map(|h| format!("toDateTime({h})"))),
                join(parts.iter())
            ))
            .fetch_all::<SessionRow>()
            .await?;
    }
    Ok((windows, sessions))
}

fn join<T: std::fmt::Display>(items: impl Iterator<Item = T>) -> String {
    items.map(|i| i.to_string()).collect::<Vec<_>>().join(",")
}

#[derive(Debug, Clone, Row, Serialize)]
pub struct CheckpointRow {
    pub topic: String,
    pub kafka_partition: i32,
    pub next_offset: u64,
}

/// Where the windows end, per partition of `topic`: the next offset to consume.
pub async fn checkpoints(client: &Client, topic: &str) -> Result<BTreeMap<i32, i64>, clickhouse::error::Error> {
    let rows: Vec<(i32, u64)> = client
        .query(
            "SELECT kafka_partition, max(next_offset) FROM meter_checkpoints WHERE topic = ? GROUP BY kafka_partition",
        )
        .bind(topic)
        .fetch_all()
        .await?;
    Ok(rows.into_iter().map(|(p, o)| (p, i64::try_from(o).unwrap_or(i64::MAX))).collect())
}
