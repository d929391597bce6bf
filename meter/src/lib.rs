//! Tollgate's meter: the usage stream into ClickHouse, exactly where the table ends.
//!
//! On start the meter reads, per partition, the highest Kafka offset ClickHouse already holds and
//! consumes from the next one; the broker's committed offsets are written for monitoring only. A
//! crash between an insert and a commit therefore neither loses nor repeats a row.

pub mod metrics;
pub mod migrate;
pub mod report;
pub mod sink;
pub mod window;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clickhouse::Client;
use metrics_exporter_prometheus::PrometheusHandle;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tollgate_schemas::avro::AvroCodec;
use tollgate_schemas::usage::UsageEvent;
use tracing::{debug, error, info, warn};

use sink::UsageRow;
use window::Windows;

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

#[derive(Debug, Clone)]
pub struct Config {
    pub brokers: String,
    pub usage_topic: String,
    /// Where events that cannot be decoded are sent.
    pub dead_letter_topic: String,
    pub group_id: String,
    pub clickhouse: ClickHouseConfig,
    /// A batch is written when it has this many rows…
    pub batch_max_rows: usize,
    /// …or when its first row has waited this long.
    pub batch_max_wait: Duration,
    pub kafka_extra: Vec<(String, String)>,
    pub metrics: Option<PrometheusHandle>,
}

impl Config {
    pub fn new(brokers: String, clickhouse: ClickHouseConfig) -> Self {
        Self {
            brokers,
            usage_topic: tollgate_schemas::topics::USAGE.into(),
            dead_letter_topic: tollgate_schemas::topics::USAGE_DEAD_LETTERS.into(),
            group_id: "tollgate-meter".into(),
            clickhouse,
            batch_max_rows: 50_000,
            batch_max_wait: Duration::from_millis(500),
            kafka_extra: Vec::new(),
            metrics: None,
        }
    }
}

/// Applies migrations, then consumes until `shutdown`; the last batch is written before return.
pub async fn run(config: Config, listener: TcpListener, shutdown: CancellationToken) -> anyhow::Result<()> {
    metrics::describe();
    let applied = migrate::apply(&config.clickhouse.server_client(), &config.clickhouse.database)
        .await
        .context("applying ClickHouse migrations")?;
    info!(applied, database = %config.clickhouse.database, "clickhouse schema is current");
    let http = axum::serve(listener, tollgate_runtime::ops_router(config.metrics.clone()))
        .with_graceful_shutdown(shutdown.clone().cancelled_owned());
    let http = tokio::spawn(async move { http.await });
    let result = consume(&config, &shutdown).await;
    shutdown.cancel();
    let _ = http.await;
    result
}

async fn consume(config: &Config, shutdown: &CancellationToken) -> anyhow::Result<()> {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", &config.brokers)
        .set("group.id", &config.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false");
    for (k, v) in &config.kafka_extra {
        cc.set(k, v);
    }
    let consumer: Arc<StreamConsumer> = Arc::new(cc.create().context("creating the Kafka consumer")?);
    let ch = config.clickhouse.client();
    let topic = config.usage_topic.clone();

    let partitions = loop {
        match partitions_of(&consumer, &topic).await {
            Ok(p) if !p.is_empty() => break p,
            Ok(_) => warn!(%topic, "topic has no partitions yet; waiting"),
            Err(e) => warn!(%topic, error = %e, "cannot read topic metadata; retrying"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    };
    let stored = retry_clickhouse(shutdown, "reading checkpoints", || sink::checkpoints(&ch, &topic)).await;
    let Some(stored) = stored else { return Ok(()) };
    // One meter reads every partition, from where ClickHouse's windows end (not from the
    // group's committed offsets, which are written for monitoring only). Raw rows past it are
    // written again and collapse on event_id; the windows skip what they already cover.
    let mut tpl = TopicPartitionList::new();
    for p in &partitions {
        let offset = stored.get(p).map_or(Offset::Beginning, |o| Offset::Offset(*o));
        tpl.add_partition_offset(&topic, *p, offset)?;
    }
    consumer.assign(&tpl).context("assigning partitions")?;
    info!(%topic, ?partitions, resume = ?stored, "meter consuming");
    let dead_letters = DeadLetters::new(config)?;

    let codec = UsageEvent::codec()?;
    let mut batch: Vec<UsageRow> = Vec::with_capacity(config.batch_max_rows.min(100_000));
    let mut last: BTreeMap<i32, i64> = BTreeMap::new();
    let mut deadline: Option<Instant> = None;
    let mut windows = Windows::default();
    loop {
        let flush_now = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            () = sleep_until(deadline), if deadline.is_some() => true,
            msg = consumer.recv() => match msg {
                Ok(m) => {
                    metrics::consumed();
                    windows.consumed(m.partition(), m.offset());
                    match decode(&codec, m.payload()) {
                        Ok(ev) => batch.push(UsageRow::new(ev, &topic, m.partition(), m.offset())),
                        Err(e) => {
                            metrics::decode_error();
                            dead_letters.send(&m, &e).await;
                        }
                    }
                    last.insert(m.partition(), m.offset());
                    if deadline.is_none() {
                        deadline = Some(Instant::now() + config.batch_max_wait);
                    }
                    batch.len() >= config.batch_max_rows
                }
                Err(e) => {
                    warn!(error = %e, "kafka consumer error");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    false
                }
            },
        };
        if flush_now {
            if !flush(&ch, &consumer, &topic, &mut batch, &mut last, &mut windows, shutdown).await {
                return Ok(());
            }
            deadline = None;
        }
    }
    // Shutting down: write what was read; if ClickHouse is away, it is read again next start.
    if !batch.is_empty() {
        flush(&ch, &consumer, &topic, &mut batch, &mut last, &mut windows, &CancellationToken::new()).await;
    }
    Ok(())
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Where events that cannot be decoded go, with why, so they never block their partition.
struct DeadLetters {
    producer: FutureProducer,
    topic: String,
}

impl DeadLetters {
    fn new(config: &Config) -> anyhow::Result<Self> {
        let mut cc = ClientConfig::new();
        cc.set("bootstrap.servers", &config.brokers).set("enable.idempotence", "true").set("acks", "all");
        for (k, v) in &config.kafka_extra {
            cc.set(k, v);
        }
        Ok(Self {
            producer: cc.create().context("creating the dead-letter producer")?,
            topic: config.dead_letter_topic.clone(),
        })
    }

    async fn send(&self, m: &BorrowedMessage<'_>, error: &str) {
        let partition = m.partition().to_string();
        let offset = m.offset().to_string();
        let headers = OwnedHeaders::new()
            .insert(Header { key: "tollgate-error", value: Some(error) })
            .insert(Header { key: "tollgate-source-topic", value: Some(m.topic()) })
            .insert(Header { key: "tollgate-source-partition", value: Some(&partition) })
            .insert(Header { key: "tollgate-source-offset", value: Some(&offset) });
        let mut record = FutureRecord::to(&self.topic).headers(headers).payload(m.payload().unwrap_or_default());
        if let Some(k) = m.key() {
            record = record.key(k);
        }
        match self.producer.send(record, Duration::from_secs(30)).await {
            Ok(_) => {
                metrics::dead_lettered();
                warn!(
                    partition = m.partition(),
                    offset = m.offset(),
                    error,
                    "usage event sent to the dead-letter topic"
                );
            }
            Err((e, _)) => {
                metrics::dead_letter_failed();
                error!(partition = m.partition(), offset = m.offset(), error, kafka = %e, "usage event undecodable and not dead-lettered");
            }
        }
    }
}

fn decode(codec: &AvroCodec, payload: Option<&[u8]>) -> Result<UsageEvent, String> {
    let bytes = payload.ok_or("message has no payload")?;
    codec.decode(bytes).map_err(|e| e.to_string())
}

/// Most windows kept in memory before clean ones are dropped (they are re-read on demand).
const MAX_OPEN_WINDOWS: usize = 500_000;

/// Writes the batch's raw rows, then its windows, then the checkpoint, each retried while
/// ClickHouse is away; then records the position in the consumer group. A crash between any
/// two steps is repaired by the replay from the checkpoint. Returns false when shutdown
/// interrupted the retries.
async fn flush(
    ch: &Client,
    consumer: &StreamConsumer,
    topic: &str,
    batch: &mut Vec<UsageRow>,
    last: &mut BTreeMap<i32, i64>,
    windows: &mut Windows,
    shutdown: &CancellationToken,
) -> bool {
    let started = Instant::now();
    if !batch.is_empty() {
        let rows: &[UsageRow] = batch;
        if retry_clickhouse(shutdown, "inserting usage rows", || sink::insert(ch, rows)).await.is_none() {
            return false;
        }
        let missing = windows.missing(rows);
        if !missing.is_empty() {
            let Some((w, s)) = retry_clickhouse(shutdown, "reading windows", || sink::load_windows(ch, &missing)).await
            else {
                return false;
            };
            windows.load(w, s);
        }
        windows.apply(rows);
        let (w, s) = windows.dirty();
        if retry_clickhouse(shutdown, "writing windows", || sink::insert_rows(ch, "usage_windows", &w)).await.is_none()
            || retry_clickhouse(shutdown, "writing session hours", || sink::insert_rows(ch, "session_hours", &s))
                .await
                .is_none()
        {
            return false;
        }
        windows.written();
        metrics::inserted(rows.len(), started.elapsed().as_secs_f64());
        debug!(rows = rows.len(), windows = w.len(), sessions = s.len(), "batch written");
    }
    batch.clear();
    let marks: Vec<sink::CheckpointRow> = last
        .iter()
        .map(|(p, o)| sink::CheckpointRow {
            topic: topic.to_owned(),
            kafka_partition: *p,
            next_offset: u64::try_from(o + 1).unwrap_or(0),
        })
        .collect();
    if retry_clickhouse(shutdown, "writing checkpoints", || sink::insert_rows(ch, "meter_checkpoints", &marks))
        .await
        .is_none()
    {
        return false;
    }
    let mut tpl = TopicPartitionList::new();
    for (p, o) in last.iter() {
        if tpl.add_partition_offset(topic, *p, Offset::Offset(o + 1)).is_err() {
            continue;
        }
    }
    if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
        debug!(error = %e, "offset commit failed (informational only)");
    }
    last.clear();
    windows.evict(MAX_OPEN_WINDOWS);
    true
}

/// Retries a ClickHouse call with capped exponential backoff until it succeeds or shutdown.
async fn retry_clickhouse<T, F, Fut>(shutdown: &CancellationToken, what: &str, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, clickhouse::error::Error>>,
{
    let mut backoff = Duration::from_millis(100);
    loop {
        match f().await {
            Ok(v) => return Some(v),
            Err(e) => {
                metrics::insert_error();
                warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "clickhouse unavailable: {what}");
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return None,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

async fn partitions_of(consumer: &Arc<StreamConsumer>, topic: &str) -> anyhow::Result<Vec<i32>> {
    let c = Arc::clone(consumer);
    let t = topic.to_owned();
    // fetch_metadata blocks its thread: keep it off the async workers.
    tokio::task::spawn_blocking(move || {
        let md = c.fetch_metadata(Some(&t), Duration::from_secs(10))?;
        let parts = md
            .topics()
            .iter()
            .filter(|mt| mt.name() == t && mt.error().is_none())
            .flat_map(|mt| mt.partitions().iter().map(|p| p.id()))
            .collect();
        Ok(parts)
    })
    .await?
}
