//! Writes usage rows to ClickHouse and reads back the windows a batch adds to.

use std::collections::{BTreeMap, BTreeSet};

use hashbrown::HashMap;

use clickhouse::Client;
use tollgate_store::rows::{SessionRow, UsageRow, WindowRow};
use tollgate_store::{IN_ARRAY, tables};

use crate::metrics;
use crate::window::{Missing, SessionKey, WindowKey};

/// Inserts one batch of raw usage rows as one INSERT (one block per month partition).
pub async fn insert(client: &Client, rows: &[UsageRow]) -> Result<(), clickhouse::error::Error> {
    tollgate_store::insert_rows(client, tables::USAGE_EVENTS, rows).await
}

/// Keys asked for per query: their values go into the SQL as IN sets (well under ClickHouse's
/// 256 KiB `max_query_size`).
const KEY_CHUNK: usize = 8000;

/// The current rows of the windows and session-hours `missing` names: each query narrows by the
/// sort key's columns as IN sets of the touched values (granularity and start or hour, then
/// project, team and user, or workflow and session) and the partitions, so ClickHouse reads only
/// the granules of those keys and what comes back is in proportion to the batch: a new session
/// or user reads back nothing, where reading every row of its hour or month and partition grew
/// with the table. The sets' cross product may bring back a few rows not asked for; they are
/// current rows all the same, which `Windows::load` takes where memory has none.
pub async fn load_windows(
    client: &Client,
    missing: &Missing,
) -> Result<(Vec<WindowRow>, Vec<SessionRow>), clickhouse::error::Error> {
    let mut windows = Vec::new();
    let keys: Vec<&WindowKey> = missing.windows.iter().collect();
    for chunk in keys.chunks(KEY_CHUNK) {
        let mut by_granularity: BTreeMap<&'static str, (BTreeSet<u32>, BTreeSet<i32>)> = BTreeMap::new();
        let (mut projects, mut teams, mut users) = (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
        for k in chunk {
            let e = by_granularity.entry(k.granularity.as_str()).or_default();
            e.0.insert(k.start);
            e.1.insert(k.partition);
            projects.insert(k.dims.project.as_str());
            teams.insert(k.dims.team.as_str());
            users.insert(k.dims.user_id.as_str());
        }
        let narrow = by_granularity
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
        let sql = format!(
            "SELECT ?fields FROM {} FINAL WHERE ({narrow}) AND project IN {IN_ARRAY} AND team IN {IN_ARRAY} \
             AND user_id IN {IN_ARRAY}",
            tables::USAGE_WINDOWS,
        );
        let q = client.query(&sql).bind(as_vec(projects)).bind(as_vec(teams)).bind(as_vec(users));
        windows.extend(q.fetch_all::<WindowRow>().await?);
    }
    let mut sessions = Vec::new();
    let keys: Vec<&SessionKey> = missing.sessions.iter().collect();
    for chunk in keys.chunks(KEY_CHUNK) {
        let hours: BTreeSet<u32> = chunk.iter().map(|k| k.hour).collect();
        let parts: BTreeSet<i32> = chunk.iter().map(|k| k.partition).collect();
        let tags: BTreeSet<&str> = chunk.iter().map(|k| k.workflow_tag.as_str()).collect();
        let ids: BTreeSet<&str> = chunk.iter().map(|k| k.session_id.as_str()).collect();
        let sql = format!(
            "SELECT ?fields FROM {} FINAL WHERE hour IN ({}) AND workflow_tag IN {IN_ARRAY} \
             AND session_id IN {IN_ARRAY} AND kafka_partition IN ({})",
            tables::SESSION_HOURS,
            join(hours.iter().map(|h| format!("toDateTime({h})"))),
            join(parts.iter()),
        );
        let q = client.query(&sql).bind(as_vec(tags)).bind(as_vec(ids));
        sessions.extend(q.fetch_all::<SessionRow>().await?);
    }
    metrics::read_back(windows.len(), sessions.len());
    Ok((windows, sessions))
}

fn as_vec(set: BTreeSet<&str>) -> Vec<&str> {
    set.into_iter().collect()
}

fn join<T: std::fmt::Display>(items: impl Iterator<Item = T>) -> String {
    items.map(|i| i.to_string()).collect::<Vec<_>>().join(",")
}

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
    // Event ids are the producer's choice: the map hashes them as `Windows` does (see there).
    let mut first: HashMap<&str, (i32, i64)> = HashMap::with_capacity(rows.len());
    for r in rows {
        let at = (r.kafka_partition, r.kafka_offset);
        first.entry(r.event_id.as_str()).and_modify(|f| *f = (*f).min(at)).or_insert(at);
    }
    let ids: Vec<&str> = first.keys().copied().collect();
    for (id, at) in tollgate_store::first_positions(client, topic, &ids).await? {
        if let Some(f) = first.get_mut(id.as_str()) {
            *f = (*f).min(at);
        }
    }
    Ok(rows.iter().filter(|r| first.get(r.event_id.as_str()) == Some(&(r.kafka_partition, r.kafka_offset))).collect())
}
