//! Writes usage rows to ClickHouse and reads back the windows a batch adds to.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use clickhouse::Client;
use tollgate_store::rows::{SessionRow, UsageRow, WindowRow};
use tollgate_store::tables;

use crate::window::Missing;

/// Inserts one batch of raw usage rows as one INSERT (one block per month partition).
pub async fn insert(client: &Client, rows: &[UsageRow]) -> Result<(), clickhouse::error::Error> {
    tollgate_store::insert_rows(client, tables::USAGE_EVENTS, rows).await
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
            .query(&format!("SELECT ?fields FROM {} FINAL WHERE {cond}", tables::USAGE_WINDOWS))
            .fetch_all::<WindowRow>()
            .await?;
    }
    let mut sessions = Vec::new();
    let hours: BTreeSet<u32> = missing.sessions.iter().map(|(h, _)| *h).collect();
    let parts: BTreeSet<i32> = missing.sessions.iter().map(|(_, p)| *p).collect();
    if !hours.is_empty() {
        sessions = client
            .query(&format!(
                "SELECT ?fields FROM {} FINAL WHERE hour IN ({}) AND kafka_partition IN ({})",
                tables::SESSION_HOURS,
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

/// Event ids looked up per query (a few tens of KiB of SQL).
const ID_LOOKUP_CHUNK: usize = 1000;

/// The rows of `rows` (read from `topic`) that are the first copy of their event: the copy at
/// the smallest position (partition, offset) among the batch and every position
/// `event_positions` holds. The ingress re-sends an event whose delivery it could not confirm,
/// with the same id and key (so to the same partition) at a later offset, at any time later:
/// only the first copy may count in the rollups. A replayed batch finds its own positions
/// again, which changes nothing. (Copies on different partitions, possible only when the
/// topic's partition count changes between them, are each the first of their partition.)
pub async fn first_copies<'a>(
    client: &Client,
    topic: &str,
    rows: &'a [UsageRow],
) -> Result<Vec<&'a UsageRow>, clickhouse::error::Error> {
    let mut first: HashMap<&str, (i32, i64)> = HashMap::new();
    for r in rows {
        let at = (r.kafka_partition, r.kafka_offset);
        first.entry(r.event_id.as_str()).and_modify(|f| *f = (*f).min(at)).or_insert(at);
    }
    let ids: Vec<&str> = first.keys().copied().collect();
    for chunk in ids.chunks(ID_LOOKUP_CHUNK) {
        let sql = format!(
            "SELECT event_id, kafka_partition, min(kafka_offset) FROM {} WHERE kafka_topic = ? AND event_id IN ({}) \
             GROUP BY event_id, kafka_partition",
            tables::EVENT_POSITIONS,
            vec!["?"; chunk.len()].join(",")
        );
        let mut q = client.query(&sql).bind(topic);
        for id in chunk {
            q = q.bind(*id);
        }
        for (id, partition, offset) in q.fetch_all::<(String, i32, i64)>().await? {
            if let Some(f) = first.get_mut(id.as_str()) {
                *f = (*f).min((partition, offset));
            }
        }
    }
    Ok(rows.iter().filter(|r| first.get(r.event_id.as_str()) == Some(&(r.kafka_partition, r.kafka_offset))).collect())
}
