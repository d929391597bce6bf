//! Writes usage rows to ClickHouse and reads back the windows a batch adds to.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use clickhouse::Client;
use tollgate_store::rows::{SessionRow, UsageRow, WindowRow};
use tollgate_store::tables;

use crate::metrics;
use crate::window::{Dims, Missing, SessionKey, WindowKey};

/// Inserts one batch of raw usage rows as one INSERT (one block per month partition).
pub async fn insert(client: &Client, rows: &[UsageRow]) -> Result<(), clickhouse::error::Error> {
    tollgate_store::insert_rows(client, tables::USAGE_EVENTS, rows).await
}

/// Keys asked for per query: each is a tuple of bound strings in the SQL (a few hundred KiB at
/// most).
const KEY_CHUNK: usize = 500;

/// The current rows of the windows and session-hours `missing` names, and only those: each
/// query narrows by the primary key's leading columns (granularity and start, or hour) and the
/// partitions, then asks for the exact dimension tuples, so what comes back is in proportion to
/// the batch. (A key absent from ClickHouse is a new window: nothing comes back for it.)
pub async fn load_windows(
    client: &Client,
    missing: &Missing,
) -> Result<(Vec<WindowRow>, Vec<SessionRow>), clickhouse::error::Error> {
    let mut windows = Vec::new();
    let keys: Vec<&WindowKey> = missing.windows.iter().collect();
    for chunk in keys.chunks(KEY_CHUNK) {
        let mut by_granularity: BTreeMap<&'static str, (BTreeSet<u32>, BTreeSet<i32>)> = BTreeMap::new();
        let mut dims: BTreeSet<&Dims> = BTreeSet::new();
        for k in chunk {
            let e = by_granularity.entry(k.granularity.as_str()).or_default();
            e.0.insert(k.start);
            e.1.insert(k.partition);
            dims.insert(&k.dims);
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
        // The sort key's next columns as plain IN sets too: ClickHouse narrows the granules it
        // reads by those (a tuple IN alone only filters what was read).
        let set = |f: fn(&Dims) -> &str| dims.iter().map(|d| f(d)).collect::<BTreeSet<&str>>();
        let (projects, teams, users) = (set(|d| &d.project), set(|d| &d.team), set(|d| &d.user_id));
        let marks = |n: usize| vec!["?"; n].join(",");
        let sql = format!(
            "SELECT ?fields FROM {} FINAL WHERE ({narrow}) AND project IN ({}) AND team IN ({}) AND user_id IN ({}) \
             AND (project, team, user_id, cost_center, workflow_tag, environment, api_key_id, virtual_model, \
             provider, model, model_version) IN ({})",
            tables::USAGE_WINDOWS,
            marks(projects.len()),
            marks(teams.len()),
            marks(users.len()),
            vec!["(?,?,?,?,?,?,?,?,?,?,?)"; dims.len()].join(",")
        );
        let mut q = client.query(&sql);
        for v in projects.into_iter().chain(teams).chain(users) {
            q = q.bind(v);
        }
        for d in dims {
            for v in [
                &d.project,
                &d.team,
                &d.user_id,
                &d.cost_center,
                &d.workflow_tag,
                &d.environment,
                &d.api_key_id,
                &d.virtual_model,
                &d.provider,
                &d.model,
                &d.model_version,
            ] {
                q = q.bind(v.as_str());
            }
        }
        windows.extend(q.fetch_all::<WindowRow>().await?);
    }
    let mut sessions = Vec::new();
    let keys: Vec<&SessionKey> = missing.sessions.iter().collect();
    for chunk in keys.chunks(KEY_CHUNK) {
        let hours: BTreeSet<u32> = chunk.iter().map(|k| k.hour).collect();
        let parts: BTreeSet<i32> = chunk.iter().map(|k| k.partition).collect();
        let ids: BTreeSet<(&str, &str, &str, &str, &str)> = chunk
            .iter()
            .map(|k| {
                (
                    k.workflow_tag.as_str(),
                    k.session_id.as_str(),
                    k.project.as_str(),
                    k.team.as_str(),
                    k.user_id.as_str(),
                )
            })
            .collect();
        let tags: BTreeSet<&str> = ids.iter().map(|k| k.0).collect();
        let sessions_of: BTreeSet<&str> = ids.iter().map(|k| k.1).collect();
        let marks = |n: usize| vec!["?"; n].join(",");
        let sql = format!(
            "SELECT ?fields FROM {} FINAL WHERE hour IN ({}) AND workflow_tag IN ({}) AND session_id IN ({}) \
             AND kafka_partition IN ({}) AND (workflow_tag, session_id, project, team, user_id) IN ({})",
            tables::SESSION_HOURS,
            join(hours.iter().map(|h| format!("toDateTime({h})"))),
            marks(tags.len()),
            marks(sessions_of.len()),
            join(parts.iter()),
            vec!["(?,?,?,?,?)"; ids.len()].join(",")
        );
        let mut q = client.query(&sql);
        for v in tags.into_iter().chain(sessions_of) {
            q = q.bind(v);
        }
        for (w, s, p, t, u) in ids {
            q = q.bind(w).bind(s).bind(p).bind(t).bind(u);
        }
        sessions.extend(q.fetch_all::<SessionRow>().await?);
    }
    metrics::read_back(windows.len(), sessions.len());
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
