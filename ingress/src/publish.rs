//! Publishes usage events to Kafka off the request path: a bounded queue, one producer task.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tollgate_schemas::avro::AvroCodec;
use tollgate_schemas::usage::UsageEvent;
use tracing::{debug, error, warn};

use crate::metrics;

#[derive(Debug, Clone)]
pub struct KafkaConfig {
    /// `host:port,host:port`
    pub brokers: String,
    pub usage_topic: String,
    /// Extra librdkafka settings (`security.protocol`, `sasl.*`, …), applied last.
    pub extra: Vec<(String, String)>,
}

/// Handle the request path uses; cloning is cheap.
#[derive(Clone)]
pub struct Publisher {
    tx: mpsc::Sender<UsageEvent>,
}

/// The producer task; `shutdown` flushes everything queued before it returns.
pub struct PublisherTask {
    handle: JoinHandle<()>,
}

impl Publisher {
    /// Builds the idempotent producer (`acks=all`) and starts its task.
    pub fn start(cfg: &KafkaConfig, capacity: usize) -> anyhow::Result<(Publisher, PublisherTask)> {
        let mut cc = ClientConfig::new();
        cc.set("bootstrap.servers", &cfg.brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("compression.type", "lz4")
            .set("message.timeout.ms", "300000");
        for (k, v) in &cfg.extra {
            cc.set(k, v);
        }
        let producer: FutureProducer = cc.create()?;
        let codec = Arc::new(UsageEvent::codec()?);
        let (tx, rx) = mpsc::channel(capacity);
        let handle = tokio::spawn(produce(producer, codec, cfg.usage_topic.clone(), rx));
        Ok((Publisher { tx }, PublisherTask { handle }))
    }

    /// Queues an event; never waits. A full queue drops the event, counted and logged.
    pub fn publish(&self, event: UsageEvent) {
        match self.tx.try_send(event) {
            Ok(()) => metrics::publish_queue_depth(self.tx.max_capacity() - self.tx.capacity()),
            Err(mpsc::error::TrySendError::Full(ev)) => {
                metrics::event_dropped("queue_full");
                error!(event_id = %ev.event_id, "usage event dropped: publish queue full");
            }
            Err(mpsc::error::TrySendError::Closed(ev)) => {
                metrics::event_dropped("shutting_down");
                error!(event_id = %ev.event_id, "usage event dropped: publisher stopped");
            }
        }
    }
}

impl PublisherTask {
    /// Waits until every queued event is delivered or failed. Call after all `Publisher`s are dropped.
    pub async fn shutdown(self) {
        if let Err(e) = self.handle.await {
            error!(error = %e, "publisher task failed");
        }
    }
}

async fn produce(producer: FutureProducer, codec: Arc<AvroCodec>, topic: String, mut rx: mpsc::Receiver<UsageEvent>) {
    let mut inflight = FuturesUnordered::new();
    loop {
        tokio::select! {
            next = rx.recv() => {
                let Some(ev) = next else { break };
                let payload = match codec.encode(&ev) {
                    Ok(p) => p,
                    Err(e) => {
                        metrics::event_dropped("encode");
                        error!(event_id = %ev.event_id, error = %e, "usage event dropped: cannot encode");
                        continue;
                    }
                };
                // Key by session so one session's events stay ordered in one partition.
                let key = ev.envelope.session_id.clone().unwrap_or_else(|| ev.event_id.clone());
                let mut record = FutureRecord::to(&topic).key(&key).payload(&payload);
                loop {
                    match producer.send_result(record) {
                        Ok(delivery) => {
                            inflight.push(async move { (ev.event_id, delivery.await) });
                            break;
                        }
                        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                            // librdkafka's own buffer is full: wait for deliveries, then retry.
                            record = back;
                            if let Some((id, res)) = inflight.next().await {
                                settle(&id, res);
                            } else {
                                tokio::time::sleep(Duration::from_millis(10)).await;
                            }
                        }
                        Err((e, _)) => {
                            metrics::event_dropped("produce");
                            error!(event_id = %ev.event_id, error = %e, "usage event dropped: producer refused it");
                            break;
                        }
                    }
                }
            }
            Some((id, res)) = inflight.next(), if !inflight.is_empty() => settle(&id, res),
        }
    }
    while let Some((id, res)) = inflight.next().await {
        settle(&id, res);
    }
    if let Err(e) = producer.flush(Duration::from_secs(30)) {
        warn!(error = %e, "producer flush did not complete");
    }
}

fn settle(
    event_id: &str,
    res: Result<rdkafka::producer::future_producer::OwnedDeliveryResult, futures::channel::oneshot::Canceled>,
) {
    match res {
        Ok(Ok(d)) => {
            metrics::event_published();
            debug!(event_id, partition = d.partition, offset = d.offset, "usage event published");
        }
        Ok(Err((e, _))) => {
            metrics::event_dropped("delivery");
            error!(event_id, error = %e, "usage event not delivered");
        }
        Err(_) => {
            metrics::event_dropped("delivery");
            error!(event_id, "usage event delivery was cancelled");
        }
    }
}
