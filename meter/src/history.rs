//! The enforcer's breach decisions and alerts into ClickHouse (`breach_history`,
//! `alert_history`). Each row carries its Kafka position; on start every partition resumes after
//! the highest offset its table holds, and a replayed record collapses on its key, so the history
//! is exact whatever crashes.

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
use tollgate_store::rows::{AlertRow, BreachRow};
use tollgate_store::tables;
use tracing::{info, warn};

use crate::metrics;

#[derive(Debug, Clone)]
pub struct HistoryConfig {
    pub brokers: String,
    pub breaches_topic: String,
    pub alerts_topic: String,
    pub kafka_extra: Vec<(String, String)>,
    pub batch_max_rows: usize,
    pub batch_max_wait: Duration,
    /// How long the last write at shutdown may retry while ClickHouse is away.
    pub final_flush_timeout: Duration,
}

/// Where each (topic, partition) resumes: one past the highest offset the tables hold.
async fn resume_points(ch: &Client) -> Result<BTreeMap<(String, i32), i64>, clickhouse::error::Error> {
    let rows: Vec<(String, i32, i64)> = ch
        .query(
            "SELECT kafka_topic, kafka_partition, max(kafka_offset) FROM breach_history GROUP BY kafka_topic, kafka_partition \
             UNION ALL SELECT kafka_topic, kafka_partition, max(kafka_offset) FROM alert_history GROUP BY kafka_topic, kafka_partition",
        )
        .fetch_all()
        .await?;
    Ok(rows.into_iter().map(|(t, p, o)| ((t, p), o + 1)).collect())
}

/// Follows both topics into their tables until `shutdown`; the last batch is written first.
pub async fn run(config: HistoryConfig, ch: Client, shutdown: CancellationToken) -> anyhow::Result<()> {
    let Some(resume) = crate::retry_clickhouse(&shutdown, "reading history positions", || resume_points(&ch)).await
    else {
        return Ok(());
    };
    let settings =
        [("group.id", "tollgate-meter-history"), ("enable.auto.commit", "false"), ("enable.partition.eof", "false")];
    let fetch = Some((tollgate_runtime::kafka::Follow::History, false));
    let cc = tollgate_runtime::kafka::client_config(&config.brokers, &settings, fetch, &config.kafka_extra);
    let consumer: std::sync::Arc<StreamConsumer> =
        std::sync::Arc::new(cc.create().context("creating the history consumer")?);
    let mut tpl = TopicPartitionList::new();
    for topic in [&config.breaches_topic, &config.alerts_topic] {
        let Some(parts) = crate::wait_for_partitions(&consumer, topic, &shutdown, Duration::from_secs(2)).await else {
            return Ok(());
        };
        for p in parts {
            let at = resume.get(&(topic.clone(), p)).map_or(Offset::Beginning, |o| Offset::Offset(*o));
            tpl.add_partition_offset(topic, p, at)?;
        }
    }
    consumer.assign(&tpl).context("assigning the history partitions")?;
    info!(breaches = %config.breaches_topic, alerts = %config.alerts_topic, "meter following decisions and alerts");

    let decision_codec = BreachDecision::codec()?;
    let alert_codec = Alert::codec()?;
    let mut breaches: Vec<BreachRow> = Vec::new();
    let mut alerts: Vec<AlertRow> = Vec::new();
    let mut deadline: Option<Instant> = None;
    loop {
        let flush_now = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            () = crate::sleep_until(deadline), if deadline.is_some() => true,
            msg = consumer.recv() => match msg {
                Ok(m) => {
                    let Some(payload) = m.payload() else { continue }; // a tombstone: nothing to record
                    if m.topic() == config.breaches_topic {
                        match decode(&decision_codec, payload) {
                            Ok(d) => breaches.push(BreachRow::new(d, m.topic(), m.partition(), m.offset())),
                            Err(e) => skipped(&m, &e),
                        }
                    } else {
                        match decode(&alert_codec, payload) {
                            Ok(a) => alerts.push(AlertRow::new(a, m.topic(), m.partition(), m.offset())),
                            Err(e) => skipped(&m, &e),
                        }
                    }
                    deadline.get_or_insert_with(|| Instant::now() + config.batch_max_wait);
                    breaches.len() + alerts.len() >= config.batch_max_rows
                }
                Err(e) => {
                    warn!(error = %e, "kafka consumer error (history)");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    false
                }
            },
        };
        if flush_now {
            if !write(&ch, &mut breaches, &mut alerts, &shutdown).await {
                return Ok(());
            }
            deadline = None;
        }
    }
    if !write(&ch, &mut breaches, &mut alerts, &tollgate_runtime::cancelled_after(config.final_flush_timeout)).await {
        warn!("clickhouse unavailable at shutdown; the next start reads the last decisions and alerts again");
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

/// Inserts both batches, retrying while ClickHouse is away; false if shutdown interrupted.
async fn write(
    ch: &Client,
    breaches: &mut Vec<BreachRow>,
    alerts: &mut Vec<AlertRow>,
    stop: &CancellationToken,
) -> bool {
    if crate::retry_clickhouse(stop, "writing breach history", || {
        tollgate_store::insert_rows(ch, tables::BREACH_HISTORY, breaches)
    })
    .await
    .is_none()
        || crate::retry_clickhouse(stop, "writing alert history", || {
            tollgate_store::insert_rows(ch, tables::ALERT_HISTORY, alerts)
        })
        .await
        .is_none()
    {
        return false;
    }
    metrics::history_written(breaches.len() + alerts.len());
    breaches.clear();
    alerts.clear();
    true
}
