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
    /// Outcomes posted to the ingress, one per (project, outcome id) (`rows::OutcomeRow`).
    pub const OUTCOME_EVENTS: &str = "outcome_events";
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
    let mut insert = open_insert::<T>(client, table).await?;
    for r in rows {
        insert.write(r).await?;
    }
    insert.end().await
}

/// An INSERT into `table` with the send and end timeouts: a server that stops answering
/// mid-INSERT must become an error the caller retries, not a wait without end; re-sending a
/// batch is safe (ReplacingMergeTree, read with FINAL).
async fn open_insert<T: Row>(
    client: &Client,
    table: &str,
) -> Result<clickhouse::insert::Insert<T>, clickhouse::error::Error> {
    Ok(client.insert::<T>(table).await?.with_timeouts(Some(INSERT_SEND_TIMEOUT), Some(INSERT_END_TIMEOUT)))
}

/// Inserts the position of each of `rows` into `event_positions`. Each row is written as it is
/// made, borrowing the event id and topic: no copy of the batch is built.
pub async fn insert_positions(client: &Client, rows: &[rows::UsageRow]) -> Result<(), clickhouse::error::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut insert = open_insert::<rows::PositionRow<'static>>(client, tables::EVENT_POSITIONS).await?;
    for r in rows {
        insert.write(&rows::PositionRow::of(r)).await?;
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

/// `values` as `IN_ARRAY` with the array written in, `(SELECT arrayJoin(['a','b']))`, when every
/// value is plain (ASCII letters, digits, `-`, `_`, `.`, `:`: nothing to escape, and no `?` the
/// client would take for a marker); `None` otherwise, and then the caller binds them. (An array
/// literal, not a tuple `('a','b')`: ClickHouse parses a tuple of thousands of literals element
/// by element, which doubled its CPU in `tests/bench/meter`.) Written here because the meter looks up every
/// event id of every batch: the client escapes a bound string character by character into a
/// string grown by doubling, which cost about 4% of the meter's CPU. Event ids are UUIDs from
/// the ingress, so the bound path is for ids some other producer chose.
fn plain_in_set(values: &[&str]) -> Option<String> {
    // One table lookup per byte: the same test as a closure of comparisons cost 2.5% of the meter.
    static PLAIN: [bool; 256] = {
        let mut t = [false; 256];
        let mut b = 0;
        while b < 256 {
            let c = b as u8;
            t[b] = c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b':');
            b += 1;
        }
        t
    };
    let plain = |v: &str| v.bytes().all(|b| PLAIN[usize::from(b)]);
    if values.is_empty() || !values.iter().all(|v| plain(v)) {
        return None;
    }
    let mut out = String::with_capacity(24 + values.iter().map(|v| v.len() + 3).sum::<usize>());
    out.push_str("(SELECT arrayJoin([");
    for (i, v) in values.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('\'');
        out.push_str(v);
        out.push('\'');
    }
    out.push_str("]))");
    Some(out)
}

/// The first position (partition, offset) `event_positions` holds of each of `ids` read from
/// `topic`; ids it does not hold are absent.
pub async fn first_positions(
    client: &Client,
    topic: &str,
    ids: &[&str],
) -> Result<std::collections::HashMap<String, (i32, i64)>, clickhouse::error::Error> {
    let mut first = std::collections::HashMap::with_capacity(ids.len());
    for chunk in ids.chunks(ID_LOOKUP_CHUNK) {
        let (set, bound) = match plain_in_set(chunk) {
            Some(literal) => (literal, None),
            None => (IN_ARRAY.to_owned(), Some(chunk)),
        };
        let sql = format!(
            "SELECT event_id, kafka_partition, min(kafka_offset) FROM {} WHERE kafka_topic = ? AND event_id IN {set} \
             GROUP BY event_id, kafka_partition",
            tables::EVENT_POSITIONS,
        );
        let mut q = client.query(&sql).bind(topic);
        if let Some(ids) = bound {
            q = q.bind(ids);
        }
        for (id, partition, offset) in q.fetch_all::<(String, i32, i64)>().await? {
            first
                .entry(id)
                .and_modify(|f: &mut (i32, i64)| *f = (*f).min((partition, offset)))
                .or_insert((partition, offset));
        }
    }
    Ok(first)
}

/// `(kafka_partition = 0 AND kafka_offset < 10) OR …`: the positions below `next` (per partition,
/// the next offset not yet in ClickHouse, as `checkpoints` returns).
pub fn below_checkpoints(next: &BTreeMap<i32, i64>) -> String {
    next.iter().map(|(p, o)| format!("(kafka_partition = {p} AND kafka_offset < {o})")).collect::<Vec<_>>().join(" OR ")
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
    let rows: Vec<(i32, i64)> = client
        .query(&format!(
            "SELECT kafka_partition, max(ended_at_us) FROM {} WHERE kafka_topic = ? AND ({}) GROUP BY kafka_partition",
            tables::USAGE_EVENTS,
            below_checkpoints(next)
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn plain_ids_are_written_into_the_sql_and_others_are_left_to_the_bind() {
        assert_eq!(plain_in_set(&["0b9c-1f", "a_b.c:d"]).unwrap(), "(SELECT arrayJoin(['0b9c-1f','a_b.c:d']))");
        assert_eq!(plain_in_set(&[]), None);
        assert_eq!(plain_in_set(&[""]).unwrap(), "(SELECT arrayJoin(['']))");
        for odd in ["it's", "a?b", "back\\slash", "tab\t", "é"] {
            assert_eq!(plain_in_set(&["plain", odd]), None, "{odd:?}");
        }
    }
}
