//! What the meter keeps besides usage: the enforcer's breach decisions and alerts
//! (`breach_history`, `alert_history`) and the outcomes posted to the ingress
//! (`outcome_events`). Each row carries its Kafka position; on start every partition resumes after
//! the highest offset its table holds, and a replayed record collapses on its key, so each table
//! is exact whatever crashes. The meter runs one follower for the decisions and alerts and one
//! for the outcomes, so a topic not created yet holds back only its own table.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context as _;
use clickhouse::Client;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tollgate_schemas::avro::AvroCodec;
use tollgate_schemas::decision::{Alert, BreachDecision};
use tollgate_schemas::outcome::Outcome;
use tollgate_store::rows::{AlertRow, BreachRow, OutcomeRow};
use tollgate_store::tables;
use tracing::{info, warn};

use crate::metrics;

/// What a followed topic holds, and so where it is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Breaches,
    Alerts,
    Outcomes,
}

impl Kind {
    pub fn table(self) -> &'static str {
        match self {
            Kind::Breaches => tables::BREACH_HISTORY,
            Kind::Alerts => tables::ALERT_HISTORY,
            Kind::Outcomes => tables::OUTCOME_EVENTS,
        }
    }
}

#[derive(Debug, Clone)]
pub struct HistoryConfig {
    pub brokers: String,
    /// The consumer's group id (for monitoring: positions come from the tables).
    pub group_id: String,
    pub topics: Vec<(Kind, String)>,
    pub kafka_extra: Vec<(String, String)>,
    pub batch_max_rows: usize,
    pub batch_max_wait: Duration,
    /// How long the last write at shutdown may retry while ClickHouse is away.
    pub final_flush_timeout: Duration,
}

/// Where each (topic, partition) resumes: one past the highest offset the tables hold.
async fn resume_points(ch: &Client, kinds: &[Kind]) -> Result<BTreeMap<(String, i32), i64>, clickhouse::error::Error> {
    let sql = kinds
        .iter()
        .map(|k| {
            format!(
                "SELECT kafka_topic, kafka_partition, max(kafka_offset) FROM {} GROUP BY kafka_topic, kafka_partition",
                k.table()
            )
        })
        .collect::<Vec<_>>()
        .join(" UNION ALL ");
    let rows: Vec<(String, i32, i64)> = ch.query(&sql).fetch_all().await?;
    Ok(rows.into_iter().map(|(t, p, o)| ((t, p), o + 1)).collect())
}

/// The rows read and not yet written, per table.
#[derive(Default)]
struct Batches {
    breaches: Vec<BreachRow>,
    alerts: Vec<AlertRow>,
    outcomes: Vec<OutcomeRow>,
}

impl Batches {
    fn len(&self) -> usize {
        self.breaches.len() + self.alerts.len() + self.outcomes.len()
    }
}

/// The decoders of the three kinds.
struct Codecs {
    decision: AvroCodec,
    alert: AvroCodec,
    outcome: AvroCodec,
}

impl Codecs {
    /// Decodes `payload` of a `kind` topic into its batch.
    fn add(&self, kind: Kind, m: &rdkafka::message::BorrowedMessage<'_>, payload: &[u8], into: &mut Batches) {
        let (t, p, o) = (m.topic(), m.partition(), m.offset());
        let added = match kind {
            Kind::Breaches => decode(&self.decision, payload).map(|d| into.breaches.push(BreachRow::new(d, t, p, o))),
            Kind::Alerts => decode(&self.alert, payload).map(|a| into.alerts.push(AlertRow::new(a, t, p, o))),
            Kind::Outcomes => decode(&self.outcome, payload).map(|x| into.outcomes.push(OutcomeRow::new(x, t, p, o))),
        };
        if let Err(e) = added {
            skipped(m, &e);
        }
    }
}

/// Follows the topics into their tables until `shutdown`; the last batch is written first.
pub async fn run(config: HistoryConfig, ch: Client, shutdown: CancellationToken) -> anyhow::Result<()> {
    let kinds: Vec<Kind> = config.topics.iter().map(|(k, _)| *k).collect();
    let Some(resume) =
        crate::retry_clickhouse(&shutdown, "reading history positions", || resume_points(&ch, &kinds)).await
    else {
        return Ok(());
    };
    let settings =
        [("group.id", config.group_id.as_str()), ("enable.auto.commit", "false"), ("enable.partition.eof", "false")];
    let fetch = Some((tollgate_runtime::kafka::Follow::History, false));
    let cc = tollgate_runtime::kafka::client_config(&config.brokers, &settings, fetch, &config.kafka_extra);
    let consumer: std::sync::Arc<StreamConsumer> =
        std::sync::Arc::new(cc.create().context("creating the history consumer")?);
    let mut tpl = TopicPartitionList::new();
    for (_, topic) in &config.topics {
        let Some(parts) = crate::wait_for_partitions(&consumer, topic, &shutdown, Duration::from_secs(2)).await else {
            return Ok(());
        };
        for p in parts {
            let at = resume.get(&(topic.clone(), p)).map_or(Offset::Beginning, |o| Offset::Offset(*o));
            tpl.add_partition_offset(topic, p, at)?;
        }
    }
    consumer.assign(&tpl).context("assigning the history partitions")?;
    info!(topics = ?config.topics, "meter following decisions, alerts or outcomes");

    let codecs = Codecs { decision: BreachDecision::codec()?, alert: Alert::codec()?, outcome: Outcome::codec()? };
    let mut batches = Batches::default();
    let mut deadline: Option<Instant> = None;
    loop {
        let flush_now = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            () = crate::sleep_until(deadline), if deadline.is_some() => true,
            msg = consumer.recv() => match msg {
                Ok(m) => {
                    let Some(payload) = m.payload() else { continue }; // a tombstone: nothing to record
                    let Some(kind) = config.topics.iter().find(|(_, t)| t == m.topic()).map(|(k, _)| *k) else {
                        continue;
                    };
                    codecs.add(kind, &m, payload, &mut batches);
                    deadline.get_or_insert_with(|| Instant::now() + config.batch_max_wait);
                    batches.len() >= config.batch_max_rows
                }
                Err(e) => {
                    warn!(error = %e, "kafka consumer error (history)");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    false
                }
            },
        };
        if flush_now {
            if !write(&ch, &mut batches, &shutdown).await {
                return Ok(());
            }
            deadline = None;
        }
    }
    if !write(&ch, &mut batches, &tollgate_runtime::cancelled_after(config.final_flush_timeout)).await {
        warn!(topics = ?config.topics, "clickhouse unavailable at shutdown; the next start reads the last records again");
    }
    Ok(())
}

fn decode<T: serde::de::DeserializeOwned>(codec: &AvroCodec, payload: &[u8]) -> Result<T, String> {
    codec.decode(payload).map_err(|e| e.to_string())
}

fn skipped(m: &rdkafka::message::BorrowedMessage<'_>, error: &str) {
    metrics::history_skipped();
    warn!(
        topic = m.topic(),
        partition = m.partition(),
        offset = m.offset(),
        error,
        "history record skipped: cannot decode"
    );
}

/// Inserts the batches, retrying while ClickHouse is away; false if shutdown interrupted.
async fn write(ch: &Client, b: &mut Batches, stop: &CancellationToken) -> bool {
    let written = crate::retry_clickhouse(stop, "writing breach history", || {
        tollgate_store::insert_rows(ch, tables::BREACH_HISTORY, &b.breaches)
    })
    .await
    .is_some()
        && crate::retry_clickhouse(stop, "writing alert history", || {
            tollgate_store::insert_rows(ch, tables::ALERT_HISTORY, &b.alerts)
        })
        .await
        .is_some()
        && crate::retry_clickhouse(stop, "writing outcomes", || {
            tollgate_store::insert_rows(ch, tables::OUTCOME_EVENTS, &b.outcomes)
        })
        .await
        .is_some();
    if !written {
        return false;
    }
    metrics::history_written(b.breaches.len() + b.alerts.len());
    metrics::outcomes_written(b.outcomes.len());
    *b = Batches::default();
    true
}
