//! Writes usage rows to ClickHouse and reads back the Kafka positions it already holds.

use std::collections::{BTreeMap, BTreeSet};

use clickhouse::{Client, Row};
use serde::Serialize;

pub use crate::rows::{CheckpointRow, UsageRow};
use crate::rows::{SessionRow, WindowRow};
use crate::window::Missing;

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
