//! Tollgate's meter: the usage stream into ClickHouse, exactly where the table ends.
//!
//! On start the meter reads, per partition, the highest Kafka offset ClickHouse already holds and
//! consumes from the next one; the broker's committed offsets are written for monitoring only. A
//! crash between an insert and a commit therefore neither loses nor repeats a row. Standalone,
//! one meter assigns itself every partition; in [`Mode::Group`] several meters split them through
//! the consumer group, each partition starting at its ClickHouse checkpoint on every rebalance
//! (see [`group`]).

pub mod group;
pub mod history;
pub mod metrics;
pub mod report;
pub mod sink;
pub mod window;
mod writer;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clickhouse::Client;
use metrics_exporter_prometheus::PrometheusHandle;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::BorrowedMessage;
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tollgate_runtime::kafka::{Awaited, Producer};
use tollgate_schemas::avro::AvroCodec;
use tollgate_schemas::usage::UsageEvent;
use tracing::{debug, error, info, warn};

use group::{MeterContext, Rebalance};
use tollgate_store::rows::UsageRow;
use tollgate_store::{ClickHouseConfig, migrate};

/// Where a command reads ClickHouse: the flags (and environment) every Tollgate command that
/// queries it takes (`tollgate-meter`, `tollgate-console`).
#[derive(clap::Args, Debug, Clone)]
pub struct ClickHouseArgs {
    /// ClickHouse HTTP URL.
    #[arg(long, global = true, env = "TOLLGATE_CLICKHOUSE_URL", default_value = "http://127.0.0.1:8123")]
    pub clickhouse_url: String,
    /// ClickHouse database.
    #[arg(long, global = true, env = "TOLLGATE_CLICKHOUSE_DATABASE", default_value = "tollgate")]
    pub database: String,
    #[arg(long, global = true, env = "TOLLGATE_CLICKHOUSE_USER")]
    pub clickhouse_user: Option<String>,
    #[arg(long, global = true, env = "TOLLGATE_CLICKHOUSE_PASSWORD", hide_env_values = true)]
    pub clickhouse_password: Option<String>,
}

impl ClickHouseArgs {
    pub fn config(&self) -> ClickHouseConfig {
        ClickHouseConfig {
            url: self.clickhouse_url.clone(),
            database: self.database.clone(),
            user: self.clickhouse_user.clone(),
            password: self.clickhouse_password.clone(),
        }
    }
}

/// Default of `Config::final_flush_timeout`.
pub const FINAL_FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct Config {
    pub brokers: String,
    pub usage_topic: String,
    /// Where events that cannot be decoded are sent.
    pub dead_letter_topic: String,
    pub group_id: String,
    /// How this meter gets its partitions.
    pub mode: Mode,
    pub clickhouse: ClickHouseConfig,
    /// A batch is written when it has this many rows…
    pub batch_max_rows: usize,
    /// …or when its first row has waited this long.
    pub batch_max_wait: Duration,
    pub kafka_extra: Vec<(String, String)>,
    pub metrics: Option<PrometheusHandle>,
    /// The enforcer's (breaches, alerts) topics, kept in `breach_history` and `alert_history`;
    /// `None`: not kept.
    pub history: Option<(String, String)>,
    /// The outcomes topic, kept in `outcome_events`; `None`: not kept.
    pub outcomes_topic: Option<String>,
    /// How long the last write at shutdown may retry while ClickHouse is away; what it could
    /// not write is read again from the checkpoints by the next start.
    pub final_flush_timeout: Duration,
}

/// How meters share the usage topic's partitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// This meter assigns itself every partition: run exactly one per topic.
    #[default]
    Standalone,
    /// The meters of one `group_id` split the partitions through the consumer group
    /// (`subscribe`), and take over each other's partitions when one joins, leaves or dies.
    Group,
}

impl Config {
    pub fn new(brokers: String, clickhouse: ClickHouseConfig) -> Self {
        Self {
            brokers,
            usage_topic: tollgate_schemas::topics::USAGE.into(),
            dead_letter_topic: tollgate_schemas::topics::USAGE_DEAD_LETTERS.into(),
            group_id: "tollgate-meter".into(),
            mode: Mode::Standalone,
            clickhouse,
            batch_max_rows: 50_000,
            batch_max_wait: Duration::from_millis(500),
            kafka_extra: Vec::new(),
            metrics: None,
            history: Some((tollgate_schemas::topics::BREACHES.into(), tollgate_schemas::topics::ALERTS.into())),
            outcomes_topic: Some(tollgate_schemas::topics::OUTCOMES.into()),
            final_flush_timeout: FINAL_FLUSH_TIMEOUT,
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
    let follow = |group: &str, topics: Vec<(history::Kind, String)>| {
        let hc = history::HistoryConfig {
            brokers: config.brokers.clone(),
            group_id: format!("{}-{group}", config.group_id),
            topics,
            kafka_extra: config.kafka_extra.clone(),
            batch_max_rows: 10_000,
            batch_max_wait: config.batch_max_wait,
            final_flush_timeout: config.final_flush_timeout,
        };
        tokio::spawn(history::run(hc, config.clickhouse.client(), shutdown.clone()))
    };
    let history = config.history.clone().map(|(breaches, alerts)| {
        follow("history", vec![(history::Kind::Breaches, breaches), (history::Kind::Alerts, alerts)])
    });
    let outcomes = config.outcomes_topic.clone().map(|t| follow("outcomes", vec![(history::Kind::Outcomes, t)]));
    let result = consume(&config, &shutdown).await;
    shutdown.cancel();
    for h in history.into_iter().chain(outcomes) {
        match h.await {
            Ok(Err(e)) => error!(error = %e, "decision, alert or outcome history stopped"),
            Err(e) => error!(error = %e, "decision, alert or outcome history task failed"),
            Ok(Ok(())) => {}
        }
    }
    tollgate_runtime::log_ops_server_end("meter", http).await;
    result
}

async fn consume(config: &Config, shutdown: &CancellationToken) -> anyhow::Result<()> {
    let settings = [
        ("group.id", config.group_id.as_str()),
        ("enable.auto.commit", "false"),
        ("enable.auto.offset.store", "false"),
        ("auto.offset.reset", "earliest"),
        ("enable.partition.eof", "false"),
    ];
    let fetch = Some((tollgate_runtime::kafka::Follow::Metering, false));
    let cc = tollgate_runtime::kafka::client_config(&config.brokers, &settings, fetch, &config.kafka_extra);
    let topic = config.usage_topic.clone();
    let (context, mut rebalances) = MeterContext::new(&topic);
    let consumer: Arc<StreamConsumer<MeterContext>> =
        Arc::new(cc.create_with_context(context).context("creating the Kafka consumer")?);
    // The writer's retries end `final_flush_timeout` after shutdown: what it could not write by
    // then is read again from the checkpoints by the next start.
    let stop_writing = CancellationToken::new();
    let (writer, writing) =
        writer::spawn(config.clickhouse.client(), Arc::clone(&consumer), topic.clone(), stop_writing.clone());
    let mut meter = Meter {
        ch: config.clickhouse.client(),
        consumer: Arc::clone(&consumer),
        topic: topic.clone(),
        batch: Vec::with_capacity(config.batch_max_rows.min(100_000)),
        batch_max_rows: config.batch_max_rows,
        last: BTreeMap::new(),
        deadline: None,
        writer,
        owned: BTreeSet::new(),
    };
    let finish = |mut meter: Meter, stopped_cleanly: bool| async move {
        let unsent = meter.batch.len();
        let timeout = tokio::spawn({
            let stop = stop_writing.clone();
            let after = config.final_flush_timeout;
            async move {
                tokio::time::sleep(after).await;
                stop.cancel();
            }
        });
        // Shutting down: the batch being read goes to the writer, which writes what it holds.
        if stopped_cleanly {
            let _ = meter.hand_over(&stop_writing).await;
        }
        let Meter { writer, .. } = meter;
        drop(writer);
        let wrote_all = writing.await.unwrap_or(false);
        timeout.abort();
        if !wrote_all {
            warn!(
                unsent,
                "clickhouse unavailable at shutdown; the next start reads what was not written again from the checkpoints"
            );
        }
    };
    match config.mode {
        Mode::Standalone => {
            let Some(partitions) = wait_for_partitions(&consumer, &topic, shutdown, Duration::from_secs(1)).await
            else {
                finish(meter, false).await;
                return Ok(());
            };
            let stored =
                retry_clickhouse(shutdown, "reading checkpoints", || tollgate_store::checkpoints(&meter.ch, &topic))
                    .await;
            let Some(stored) = stored else {
                finish(meter, false).await;
                return Ok(());
            };
            // One meter reads every partition, from where ClickHouse's windows end (not from the
            // group's committed offsets, which are written for monitoring only). Raw rows past it
            // are written again and collapse on event_id; the windows skip what they already cover.
            consumer.assign(&at_checkpoints(&topic, &partitions, &stored)?).context("assigning partitions")?;
            meter.owned.extend(&partitions);
            info!(%topic, ?partitions, resume = ?stored, "meter consuming");
        }
        Mode::Group => {
            // Partitions arrive through rebalances (see `group`), each at its checkpoint.
            consumer.subscribe(&[&topic]).context("subscribing to the usage topic")?;
            info!(%topic, group = %config.group_id, "meter joining its consumer group");
        }
    }
    let dead_letters = DeadLetters::new(config)?;

    let codec = UsageEvent::codec()?;
    let consumed = metrics::consumed();
    // Both made once, the timer reset per batch: made afresh in every turn of the loop, they
    // registered a timer and a waiter for every message.
    let batch_timer = tokio::time::sleep_until(Instant::now());
    tokio::pin!(batch_timer);
    let cancelled = shutdown.cancelled();
    tokio::pin!(cancelled);
    let stopped_cleanly = loop {
        let hand_over = tokio::select! {
            biased;
            () = &mut cancelled => break true,
            Some(event) = rebalances.recv() => {
                if !meter.rebalance(event, shutdown).await {
                    break false;
                }
                false
            }
            () = &mut batch_timer, if meter.deadline.is_some() => true,
            msg = consumer.recv() => match msg {
                Ok(m) => {
                    consumed.increment(1);
                    if meter.owned.contains(&m.partition()) {
                        match decode(&codec, m.payload()) {
                            Ok(ev) => meter.batch.push(UsageRow::new(ev, &topic, m.partition(), m.offset())),
                            Err(e) => {
                                metrics::decode_error();
                                dead_letters.send(&m, &e).await;
                            }
                        }
                        meter.last.insert(m.partition(), m.offset());
                        if meter.deadline.is_none() {
                            let deadline = Instant::now() + config.batch_max_wait;
                            meter.deadline = Some(deadline);
                            batch_timer.as_mut().reset(deadline);
                        }
                    } else {
                        // librdkafka drops what it fetched for a partition it no longer assigns;
                        // should anything slip through, it is not this meter's to write.
                        debug!(partition = m.partition(), offset = m.offset(), "message of a partition not owned skipped");
                    }
                    meter.batch.len() >= config.batch_max_rows
                }
                Err(e) => {
                    warn!(error = %e, "kafka consumer error");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    false
                }
            },
        };
        if hand_over && !meter.hand_over(shutdown).await {
            break false;
        }
    };
    // Nothing reads the rebalance queue from here: the callback answers librdkafka itself while
    // the consumer closes (revoke, leave the group), and what is queued is answered now.
    consumer.context().loop_stopped();
    while let Ok(event) = rebalances.try_recv() {
        if let Err(e) = group::answer_default(&*consumer, &topic, &event) {
            debug!(error = %e, ?event, "rebalance not applied while closing");
        }
    }
    finish(meter, stopped_cleanly).await;
    // Closing a group member waits on the broker: keep it off the async workers.
    let _ = tokio::task::spawn_blocking(move || drop(consumer)).await;
    Ok(())
}

/// `partitions` of `topic`, each at its checkpoint in `stored` (from the start without one).
fn at_checkpoints(topic: &str, partitions: &[i32], stored: &BTreeMap<i32, i64>) -> anyhow::Result<TopicPartitionList> {
    let mut tpl = TopicPartitionList::new();
    for p in partitions {
        let offset = stored.get(p).map_or(Offset::Beginning, |o| Offset::Offset(*o));
        tpl.add_partition_offset(topic, *p, offset)?;
    }
    Ok(tpl)
}

/// The consume loop's state: what was read since the last hand-over to the writer.
struct Meter {
    ch: Client,
    consumer: Arc<StreamConsumer<MeterContext>>,
    topic: String,
    batch: Vec<UsageRow>,
    batch_max_rows: usize,
    /// Last offset read per partition since the last hand-over (decodable or not).
    last: BTreeMap<i32, i64>,
    /// When the batch is handed over at the latest (`None`: the batch is empty).
    deadline: Option<Instant>,
    /// Writes handed-over batches, their windows and checkpoints (see `writer`).
    writer: writer::WriterHandle,
    /// Partitions this meter reads now: all of them standalone, its assignment in a group.
    owned: BTreeSet<i32>,
}

impl Meter {
    /// Answers a rebalance (see `group`). Returns false when shutdown interrupted it.
    async fn rebalance(&mut self, event: Rebalance, shutdown: &CancellationToken) -> bool {
        match event {
            Rebalance::Assign(partitions) => self.assign(partitions, shutdown).await,
            Rebalance::Revoke { partitions, lost } => self.revoke(&partitions, lost, shutdown).await,
            Rebalance::Error { partitions, error } => {
                warn!(%error, ?partitions, "consumer group rebalance failed; dropping the partitions");
                self.revoke(&partitions, true, shutdown).await
            }
        }
    }

    /// Starts `partitions` at their ClickHouse checkpoints, with nothing of them in memory.
    async fn assign(&mut self, partitions: Vec<i32>, shutdown: &CancellationToken) -> bool {
        metrics::rebalance("assign");
        let (ch, topic) = (&self.ch, &self.topic);
        let stored = retry_clickhouse(shutdown, "reading checkpoints", || tollgate_store::checkpoints(ch, topic)).await;
        let Some(stored) = stored else {
            // Shutting down: librdkafka still waits for the call, and the consumer closes next.
            let _ = group::assign(&*self.consumer, &group::list(&self.topic, &partitions));
            return false;
        };
        // Eager protocols name the whole new assignment, and a revoke always came first; should
        // one not have, what memory holds of the old assignment is dropped all the same.
        let before =
            if group::cooperative(&*self.consumer) { BTreeSet::new() } else { std::mem::take(&mut self.owned) };
        let forget: Vec<i32> = before.iter().chain(&partitions).copied().collect();
        if !self.forget(forget, shutdown).await {
            let _ = group::assign(&*self.consumer, &group::list(&self.topic, &partitions));
            return false;
        }
        let tpl = match at_checkpoints(&self.topic, &partitions, &stored) {
            Ok(tpl) => tpl,
            Err(e) => {
                error!(error = %e, ?partitions, "cannot list the assigned partitions");
                group::list(&self.topic, &[])
            }
        };
        if let Err(e) = group::assign(&*self.consumer, &tpl) {
            error!(error = %e, ?partitions, "assigning partitions failed");
            return true;
        }
        self.owned.extend(tpl.elements().iter().map(|e| e.partition()));
        let resume: BTreeMap<i32, Option<&i64>> = partitions.iter().map(|p| (*p, stored.get(p))).collect();
        info!(?partitions, ?resume, owned = ?self.owned, "partitions assigned");
        true
    }

    /// Gives up `partitions` (eager protocols: all), after writing what was read of them unless
    /// the assignment is already lost. Nothing of them stays in memory.
    async fn revoke(&mut self, partitions: &[i32], lost: bool, shutdown: &CancellationToken) -> bool {
        metrics::rebalance(if lost { "lost" } else { "revoke" });
        let gone: BTreeSet<i32> = if group::cooperative(&*self.consumer) {
            partitions.iter().copied().collect()
        } else {
            self.owned.iter().chain(partitions).copied().collect()
        };
        let unwritten = self.batch.len();
        // Not lost: the partitions are this meter's until it unassigns, so everything read is
        // written and the next owner starts exactly where it ends. Lost: batches the writer
        // already holds are still written; every window row is an absolute total versioned by
        // the offset it covers, so a late write by this meter never adds to the new owner's.
        let flushed = lost || (self.hand_over(shutdown).await && self.writer.drained(shutdown).await);
        let dropped = self.batch.iter().filter(|r| gone.contains(&r.kafka_partition)).count();
        let forgotten = self.forget(gone.iter().copied().collect(), shutdown).await;
        self.owned.retain(|p| !gone.contains(p));
        if let Err(e) = group::unassign(&*self.consumer, &group::list(&self.topic, partitions)) {
            warn!(error = %e, ?partitions, "unassigning partitions failed");
        }
        info!(partitions = ?gone, lost, unwritten, dropped, owned = ?self.owned, "partitions revoked");
        flushed && forgotten
    }

    /// Drops every unwritten row, offset and window of `partitions`: the next owner replays
    /// them from the checkpoint. False once the writer has stopped.
    async fn forget(&mut self, partitions: Vec<i32>, shutdown: &CancellationToken) -> bool {
        self.batch.retain(|r| !partitions.contains(&r.kafka_partition));
        self.last.retain(|p, _| !partitions.contains(p));
        if self.batch.is_empty() && self.last.is_empty() {
            self.deadline = None;
        }
        self.writer.send(writer::Job::Forget(partitions), shutdown).await
    }

    /// Hands the batch and its offsets to the writer and starts the next one; waits only while
    /// the writer already holds a batch. False once the writer has stopped or `interrupt` fired.
    async fn hand_over(&mut self, interrupt: &CancellationToken) -> bool {
        self.deadline = None;
        if self.batch.is_empty() && self.last.is_empty() {
            return true;
        }
        let next = self.writer.spare().unwrap_or_else(|| Vec::with_capacity(self.batch_max_rows.min(100_000)));
        let rows = std::mem::replace(&mut self.batch, next);
        let last = std::mem::take(&mut self.last);
        self.writer.send(writer::Job::Write { rows, last }, interrupt).await
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Where events that cannot be decoded go, with why, so they never block their partition.
struct DeadLetters {
    producer: Producer<Awaited>,
    topic: String,
}

impl DeadLetters {
    fn new(config: &Config) -> anyhow::Result<Self> {
        let settings = [("enable.idempotence", "true"), ("acks", "all")];
        let cc = tollgate_runtime::kafka::client_config(&config.brokers, &settings, None, &config.kafka_extra);
        Ok(Self {
            producer: Producer::new(&cc, Awaited).context("creating the dead-letter producer")?,
            topic: config.dead_letter_topic.clone(),
        })
    }

    async fn send(&self, m: &BorrowedMessage<'_>, error: &str) {
        match tollgate_runtime::kafka::dead_letter(&self.producer, &self.topic, m, error, "meter").await {
            Ok(_) => {
                metrics::dead_lettered();
                warn!(
                    partition = m.partition(),
                    offset = m.offset(),
                    error,
                    "usage event sent to the dead-letter topic"
                );
            }
            Err(e) => {
                metrics::dead_letter_failed();
                error!(partition = m.partition(), offset = m.offset(), error, kafka = %e, "usage event undecodable and not dead-lettered");
            }
        }
    }
}

/// The event, or why it cannot be counted: no payload, not a usage event, or amounts that cannot
/// be right (`UsageEvent::implausible`: a negative cost would subtract spend from every rollup).
fn decode(codec: &AvroCodec, payload: Option<&[u8]>) -> Result<UsageEvent, String> {
    let bytes = payload.ok_or("message has no payload")?;
    let ev: UsageEvent = codec.decode(bytes).map_err(|e| e.to_string())?;
    match ev.implausible() {
        Some(why) => Err(format!("implausible usage event: {why}")),
        None => Ok(ev),
    }
}

/// Retries a ClickHouse call with capped exponential backoff until it succeeds or shutdown.
async fn retry_clickhouse<T, F, Fut>(shutdown: &CancellationToken, what: &str, f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, clickhouse::error::Error>>,
{
    tollgate_runtime::retry_with_backoff(shutdown, "clickhouse", what, |_| metrics::insert_error(), f).await
}

/// The topic's partitions, asking again every `every` until it has some; `None` on shutdown.
async fn wait_for_partitions<C: rdkafka::consumer::ConsumerContext + 'static>(
    consumer: &Arc<StreamConsumer<C>>,
    topic: &str,
    shutdown: &CancellationToken,
    every: Duration,
) -> Option<Vec<i32>> {
    loop {
        match partitions_of(consumer, topic).await {
            Ok(p) if !p.is_empty() => return Some(p),
            Ok(_) => warn!(%topic, "topic has no partitions yet; waiting"),
            Err(e) => warn!(%topic, error = %e, "cannot read topic metadata; retrying"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return None,
            () = tokio::time::sleep(every) => {}
        }
    }
}

async fn partitions_of<C: rdkafka::consumer::ConsumerContext + 'static>(
    consumer: &Arc<StreamConsumer<C>>,
    topic: &str,
) -> anyhow::Result<Vec<i32>> {
    let c = Arc::clone(consumer);
    let t = topic.to_owned();
    // fetch_metadata blocks its thread: keep it off the async workers.
    tokio::task::spawn_blocking(move || {
        let md = c.fetch_metadata(Some(&t), Duration::from_secs(10))?;
        Ok(tollgate_runtime::partitions_in(&md, &t))
    })
    .await?
}
