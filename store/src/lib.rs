//! ClickHouse for every Tollgate service: the connection settings, the migrations that define
//! every table, the table names, one row type per table, and the queries more than one service
//! needs (the meter's checkpoints). The meter writes through it; the enforcer and the reports read
//! through it; no other crate owns a table.

pub mod migrate;
pub mod rows;

use std::collections::BTreeMap;

use clickhouse::{Client, Row};
use serde::Serialize;

/// The tables, by name, as the migrations create them.
pub mod tables {
    /// One row per usage event (`rows::UsageRow`), ReplacingMergeTree on the event id.
    pub const USAGE_EVENTS: &str = "usage_events";
    /// Sums per window, dimension and partition (`rows::WindowRow`).
    pub const USAGE_WINDOWS: &str = "usage_windows";
    /// Sums per session and hour (`rows::SessionRow`).
    pub const SESSION_HOURS: &str = "session_hours";
    /// Every position at which the meter read each event id (`rows::PositionRow`): the first
    /// one is the copy the rollups count.
    pub const EVENT_POSITIONS: &str = "event_positions";
    /// Where the meter's windows end, per topic and partition (`rows::CheckpointRow`).
    pub const METER_CHECKPOINTS: &str = "meter_checkpoints";
    /// The enforcer's decisions as the meter read them (`rows::BreachRow`).
    pub const BREACH_HISTORY: &str = "breach_history";
    /// The enforcer's alerts as the meter read them (`rows::AlertRow`).
    pub const ALERT_HISTORY: &str = "alert_history";
}

#[derive(Debug, Clone)]
pub struct ClickHouseConfig {
    pub url: String,
    pub database: String,
    pub user: Option<String>,
    pub password: Option<String>,
}

impl ClickHouseConfig {
    /// A client for this server and database. Validation is off because ClickHouse 18.16 does
    /// not know `RowBinaryWithNamesAndTypes`; compression is off because with LZ4 a SELECT on
    /// 18.16 came back empty without an error.
    pub fn client(&self) -> Client {
        let mut c = Client::default()
            .with_url(&self.url)
            .with_database(&self.database)
            .with_validation(false)
            .with_compression(clickhouse::Compression::None);
        if let Some(u) = &self.user {
            c = c.with_user(u);
        }
        if let Some(p) = &self.password {
            c = c.with_password(p);
        }
        c
    }

    /// A client with no default database, for statements that create it.
    pub fn server_client(&self) -> Client {
        let mut cfg = self.clone();
        cfg.database = "default".into();
        cfg.client()
    }
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

/// Event ids looked up per query (about 160 KiB of SQL, under ClickHouse's 256 KiB
/// `max_query_size`).
const ID_LOOKUP_CHUNK: usize = 4000;

/// An IN set from one bound array: the client binds each `?` by scanning for the first unbound
/// one, so thousands of markers cost quadratic time, where one array is one bind. ClickHouse
/// still narrows by the primary key with a set from a subquery.
pub const IN_ARRAY: &str = "(SELECT arrayJoin(?))";

/// The first position (partition, offset) `event_positions` holds of each of `ids` read from
/// `topic`; ids it does not hold are absent.
pub async fn first_positions(
    client: &Client,
    topic: &str,
    ids: &[&str],
) -> Result<std::collections::HashMap<String, (i32, i64)>, clickhouse::error::Error> {
    let mut first = std::collections::HashMap::with_capacity(ids.len());
    for chunk in ids.chunks(ID_LOOKUP_CHUNK) {
        let sql = format!(
            "SELECT event_id, kafka_partition, min(kafka_offset) FROM {} WHERE kafka_topic = ? AND event_id IN {IN_ARRAY} \
             GROUP BY event_id, kafka_partition",
            tables::EVENT_POSITIONS,
        );
        for (id, partition, offset) in
            client.query(&sql).bind(topic).bind(chunk).fetch_all::<(String, i32, i64)>().await?
        {
            first
                .entry(id)
                .and_modify(|f: &mut (i32, i64)| *f = (*f).min((partition, offset)))
                .or_insert((partition, offset));
        }
    }
    Ok(first)
}

/// Per partition of `topic`, the latest `ended_at_us` of the events before `next` (the meter's
/// checkpoints): a copy of any of them ended no later.
pub async fn latest_ended_before(
    client: &Client,
    topic: &str,
    next: &BTreeMap<i32, i64>,
) -> Result<BTreeMap<i32, i64>, clickhouse::error::Error> {
    if next.is_empty() {
        return Ok(BTreeMap::new());
    }
    let below = next.iter().map(|(p, o)| format!("(kafka_partition = {p} AND kafka_offset < {o})")).collect::<Vec<_>>();
    let rows: Vec<(i32, i64)> = client
        .query(&format!(
            "SELECT kafka_partition, max(ended_at_us) FROM {} WHERE kafka_topic = ? AND ({}) GROUP BY kafka_partition",
            tables::USAGE_EVENTS,
            below.join(" OR ")
        ))
        .bind(topic)
        .fetch_all()
        .await?;
    Ok(rows.into_iter().collect())
}

/// Where the windows end, per partition of `topic`: the next offset to consume.
pub async fn checkpoints(client: &Client, topic: &str) -> Result<BTreeMap<i32, i64>, clickhouse::error::Error> {
    let rows: Vec<(i32, u64)> = client
        .query(&format!(
            "SELECT kafka_partition, max(next_offset) FROM {} WHERE topic = ? GROUP BY kafka_partition",
            tables::METER_CHECKPOINTS
        ))
        .bind(topic)
        .fetch_all()
        .await?;
    Ok(rows.into_iter().map(|(p, o)| (p, i64::try_from(o).unwrap_or(i64::MAX))).collect())
}
