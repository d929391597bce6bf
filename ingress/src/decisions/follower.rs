//! The decision follower: the task that reads the compacted breaches topic into the cache, in
//! full before the ingress serves and live after, with the quiet or the active fetch wait.
//!
//! **Reading the topic.** [`Follower`] assigns every partition of the topic from the beginning
//! (no consumer group: each ingress needs the whole topic) and applies records in offset order:
//! a record whose version is not above the one held for its key is ignored, a tombstone (null
//! payload) removes the key. That is right whether or not the broker has compacted the topic
//! yet: compaction only removes records a later one overrides. The ingress serves no request
//! until the topic is read up to the high watermarks taken at start, or until a deadline passes
//! (then it either refuses to start or — the default — starts open, see [`Follower::start`]).
//! It then follows the topic with the decision path's fetch wait (`tollgate_runtime::kafka`):
//! on Kafka a decision reaches the cache as soon as it is produced, on a broker that only polls
//! its storage (Tansu) within one wait.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::BorrowedMessage;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tollgate_schemas::avro::AvroCodec;
use tollgate_schemas::decision::BreachDecision;
use tracing::{debug, error, info, warn};

use super::cache::{Applied, DecisionCache};
use crate::metrics;

/// Where and how the breaches topic is read.
#[derive(Debug, Clone)]
pub struct FollowConfig {
    pub brokers: String,
    pub topic: String,
    /// Extra librdkafka settings (security, SASL), applied last.
    pub extra: Vec<(String, String)>,
    /// How long start-up waits for the topic to be read up to its watermarks.
    pub start_timeout: Duration,
    /// Refuse to start (instead of starting open) when the deadline passes.
    pub required: bool,
}

/// How far ahead of this ingress's clock a decision's version may be (clock skew between hosts);
/// beyond it the decision is ignored and counted (`decisions_ignored_total{reason="future_version"}`).
const MAX_VERSION_AHEAD_US: i64 = 3_600_000_000;
/// Between two metadata checks (new partitions, a topic created after start).
const METADATA_EVERY: Duration = Duration::from_secs(30);
/// Between two looks for a topic that does not exist (yet).
const MISSING_TOPIC_EVERY: Duration = Duration::from_secs(5);
/// Between two tries while the broker does not answer.
const RETRY_EVERY: Duration = Duration::from_secs(1);
const BROKER_TIMEOUT: Duration = Duration::from_secs(5);
/// After one logged consumer error, further ones within this window are only counted.
const ERROR_LOG_EVERY: Duration = Duration::from_secs(10);

/// The task that keeps the cache in step with the topic.
pub struct Follower {
    handle: JoinHandle<()>,
    stop: CancellationToken,
}

impl Follower {
    /// Starts following the topic and waits until it is read up to the high watermarks taken at
    /// start, at most `start_timeout`.
    ///
    /// When the deadline passes (the broker is unreachable, or the topic is slow to read), the
    /// ingress **starts open** by default: it logs an error, sets `tollgate_ingress_decisions_ready`
    /// to 0, serves without the decisions it has not read, and keeps reading (the gauge turns 1 once
    /// caught up). The ingress is on the path of every model call, and the enforcer cannot decide
    /// anything new without the broker either, so a broker outage should not also take every
    /// application's LLM traffic down at the next restart (usage events wait in the spool in the
    /// same situation). With `required` it refuses to start instead. A topic that does not exist
    /// holds no decisions: the ingress starts at once and picks the topic up when it appears.
    pub async fn start(
        cache: Arc<DecisionCache>,
        cfg: &FollowConfig,
        shutdown: &CancellationToken,
    ) -> Result<Follower, FollowError> {
        let consumer: StreamConsumer =
            follower_config(&cfg.brokers, false, &cfg.extra).create().map_err(FollowError::Consumer)?;
        metrics::decisions_ready(false);
        let (tx, rx) = oneshot::channel();
        let last_error = Arc::new(Mutex::new(None::<String>));
        // Its own token: the cache keeps following while in-flight requests drain after
        // shutdown begins; `run` stops it once the server is done.
        let stop = CancellationToken::new();
        let task = Task {
            consumer: Arc::new(consumer),
            brokers: cfg.brokers.clone(),
            extra: cfg.extra.clone(),
            quiet: false,
            cache: Arc::clone(&cache),
            topic: cfg.topic.clone(),
            codec: BreachDecision::codec().map_err(FollowError::Codec)?,
            catch_up: CatchUp { tx: Some(tx), behind: HashMap::new() },
            last_error: Arc::clone(&last_error),
            stop: stop.clone(),
            last_logged: None,
            suppressed: 0,
        };
        let handle = tokio::spawn(task.run());
        let started = Instant::now();
        let follower = Follower { handle, stop };
        tokio::select! {
            r = tokio::time::timeout(cfg.start_timeout, rx) => match r {
                Ok(Ok(())) => info!(
                    topic = %cfg.topic,
                    decisions = cache.len(),
                    ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                    "breach decisions loaded"
                ),
                Ok(Err(_)) => {} // the task stopped: shutdown
                Err(_) => {
                    let cause = last_error.lock().unwrap_or_else(PoisonError::into_inner).clone()
                        .unwrap_or_else(|| "the topic was not read up to its end in time".into());
                    if cfg.required {
                        follower.stop().await;
                        return Err(FollowError::NotLoaded {
                            topic: cfg.topic.clone(),
                            secs: cfg.start_timeout.as_secs(),
                            brokers: cfg.brokers.clone(),
                            cause,
                        });
                    }
                    error!(
                        topic = %cfg.topic, brokers = %cfg.brokers, error = %cause,
                        "breach decisions not loaded in time; serving WITHOUT them (fail open) while reading on"
                    );
                }
            },
            () = shutdown.cancelled() => {}
        }
        Ok(follower)
    }

    pub async fn stop(self) {
        self.stop.cancel();
        if let Err(e) = self.handle.await {
            warn!(error = %e, "decision follower task failed");
        }
    }
}

/// Why the decision follower did not start.
#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    #[error("creating the breaches consumer")]
    Consumer(#[source] rdkafka::error::KafkaError),
    #[error("the breach decision codec")]
    Codec(#[source] tollgate_schemas::avro::CodecError),
    /// `required` and the topic was not read up to its end before the deadline.
    #[error("breach decisions of topic {topic} not loaded within {secs} s from {brokers}: {cause}")]
    NotLoaded { topic: String, secs: u64, brokers: String, cause: String },
}

/// Partitions still to be read up to their start-time high watermark.
struct CatchUp {
    tx: Option<oneshot::Sender<()>>,
    behind: HashMap<i32, i64>,
}

struct Task {
    consumer: Arc<StreamConsumer>,
    /// The consumer's settings but its fetch wait and the operator's own (`extra`), to re-create
    /// it with the other wait.
    brokers: String,
    extra: Vec<(String, String)>,
    /// Whether the consumer has its quiet fetch wait (no request for `QUIET_AFTER`).
    quiet: bool,
    cache: Arc<DecisionCache>,
    topic: String,
    codec: AvroCodec,
    catch_up: CatchUp,
    last_error: Arc<Mutex<Option<String>>>,
    stop: CancellationToken,
    last_logged: Option<Instant>,
    suppressed: u64,
}

impl Task {
    fn caught_up(&mut self) {
        if let Some(tx) = self.catch_up.tx.take() {
            self.cache.set_ready();
            let _ = tx.send(());
        }
    }

    fn note_error(&mut self, what: &str, e: &dyn std::fmt::Display) {
        let text = format!("{what}: {e}");
        metrics::decision_consumer_error();
        *self.last_error.lock().unwrap_or_else(PoisonError::into_inner) = Some(text.clone());
        let now = Instant::now();
        if self.last_logged.is_none_or(|t| now.duration_since(t) >= ERROR_LOG_EVERY) {
            warn!(topic = %self.topic, error = %text, suppressed = self.suppressed, "breach decision consumer");
            self.last_logged = Some(now);
            self.suppressed = 0;
        } else {
            self.suppressed += 1;
        }
    }

    /// Partitions of the topic; `Ok(empty)` when the topic does not exist.
    async fn partitions(&self) -> Result<Vec<i32>, KafkaError> {
        let consumer = Arc::clone(&self.consumer);
        let topic = self.topic.clone();
        let found = tokio::task::spawn_blocking(move || {
            let md = consumer.fetch_metadata(Some(&topic), BROKER_TIMEOUT)?;
            Ok(tollgate_runtime::partitions_in(&md, &topic))
        })
        .await;
        match found {
            Ok(r) => r,
            Err(e) => {
                error!(error = %e, "breaches topic metadata task failed");
                Err(KafkaError::Canceled)
            }
        }
    }

    /// Assigns `partitions`: those in `positions` resume there, the others start at the beginning.
    fn assign(&mut self, partitions: &[i32], positions: &HashMap<i32, Offset>) -> bool {
        let mut tpl = TopicPartitionList::with_capacity(partitions.len());
        for p in partitions {
            let at = positions.get(p).copied().unwrap_or(Offset::Beginning);
            if let Err(e) = tpl.add_partition_offset(&self.topic, *p, at) {
                self.note_error("building the assignment", &e);
                return false;
            }
        }
        match self.consumer.assign(&tpl) {
            Ok(()) => true,
            Err(e) => {
                self.note_error("assigning the breaches topic", &e);
                false
            }
        }
    }

    /// The high watermark of each non-empty partition (`i64::MAX` where the broker did not say:
    /// the partition's end-of-file event marks it read).
    async fn watermarks(&self, partitions: &[i32]) -> HashMap<i32, i64> {
        let consumer = Arc::clone(&self.consumer);
        let topic = self.topic.clone();
        let parts = partitions.to_vec();
        tokio::task::spawn_blocking(move || {
            parts
                .into_iter()
                .filter_map(|p| match consumer.fetch_watermarks(&topic, p, BROKER_TIMEOUT) {
                    Ok((low, high)) if high <= low => None,
                    Ok((_, high)) => Some((p, high)),
                    Err(e) => {
                        debug!(partition = p, error = %e, "no watermark; waiting for the partition's end instead");
                        Some((p, i64::MAX))
                    }
                })
                .collect()
        })
        .await
        .unwrap_or_default()
    }

    async fn run(mut self) {
        // 1. The partitions (the topic may not exist yet, the broker may be away).
        let mut partitions = loop {
            let found = tokio::select! {
                r = self.partitions() => r,
                () = self.stop.cancelled() => return,
            };
            match found {
                Ok(p) if !p.is_empty() => break p,
                Ok(_) => {
                    if self.catch_up.tx.is_some() {
                        warn!(topic = %self.topic, "breaches topic does not exist; no breach decision applies until it does");
                        self.caught_up();
                    }
                }
                Err(e) => self.note_error("reading the breaches topic's metadata", &e),
            }
            let wait = if self.catch_up.tx.is_some() { RETRY_EVERY } else { MISSING_TOPIC_EVERY };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = self.stop.cancelled() => return,
            }
        };
        // 2. Everything from the beginning, and how far "caught up" is.
        while !self.assign(&partitions, &HashMap::new()) {
            tokio::select! {
                () = tokio::time::sleep(RETRY_EVERY) => {}
                () = self.stop.cancelled() => return,
            }
        }
        if self.catch_up.tx.is_some() {
            self.catch_up.behind = tokio::select! {
                w = self.watermarks(&partitions) => w,
                () = self.stop.cancelled() => return,
            };
            if self.catch_up.behind.is_empty() {
                self.caught_up();
            }
        }
        info!(topic = %self.topic, partitions = partitions.len(), "following breach decisions");
        // 3. Follow, with the short fetch wait while the ingress serves requests and the long one
        // after a quiet spell (tollgate_runtime::kafka).
        let mut consumer = Arc::clone(&self.consumer);
        let mut metadata = tokio::time::interval(METADATA_EVERY);
        metadata.reset();
        let mut activity = tokio::time::interval(Duration::from_secs(1));
        activity.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let cache = Arc::clone(&self.cache);
        loop {
            let mut switch_to = None;
            tokio::select! {
                () = self.stop.cancelled() => break,
                () = cache.request_after_quiet.notified(), if self.quiet => switch_to = Some(false),
                _ = activity.tick(), if !self.quiet && self.catch_up.tx.is_none() => {
                    if cache.quiet() {
                        switch_to = Some(true);
                    }
                }
                m = consumer.recv() => match m {
                    Ok(msg) => self.on_message(&msg),
                    Err(KafkaError::PartitionEOF(p)) => {
                        if self.catch_up.behind.remove(&p).is_some() && self.catch_up.behind.is_empty() {
                            self.caught_up();
                        }
                    }
                    Err(e) => self.note_error("consuming", &e),
                },
                _ = metadata.tick() => {
                    if let Ok(now) = self.partitions().await {
                        if now.iter().any(|p| !partitions.contains(p)) {
                            let positions = self.positions();
                            info!(topic = %self.topic, partitions = now.len(), "breaches topic has new partitions");
                            if self.assign(&now, &positions) {
                                partitions = now;
                            }
                        }
                    }
                }
            }
            if let Some(quiet) = switch_to {
                if let Some(old) = self.switch_wait(&partitions, quiet) {
                    consumer = Arc::clone(&self.consumer);
                    // Closing a consumer may block briefly: not on an async worker.
                    tokio::task::spawn_blocking(move || drop(old));
                }
            }
        }
        debug!("decision follower stopped");
    }

    /// Re-creates the consumer with the quiet or the active fetch wait, each partition where the
    /// old one was, and returns the old one; on failure keeps the old one.
    fn switch_wait(&mut self, partitions: &[i32], quiet: bool) -> Option<Arc<StreamConsumer>> {
        let positions = self.positions();
        let fresh: StreamConsumer = match follower_config(&self.brokers, quiet, &self.extra).create() {
            Ok(c) => c,
            Err(e) => {
                self.note_error("re-creating the consumer", &e);
                return None;
            }
        };
        let old = std::mem::replace(&mut self.consumer, Arc::new(fresh));
        if !self.assign(partitions, &positions) {
            self.consumer = old;
            return None;
        }
        self.quiet = quiet;
        tollgate_runtime::kafka::quiet_gauge(tollgate_runtime::kafka::Follow::Decisions, quiet);
        debug!(quiet, "decision follower switched fetch wait");
        Some(old)
    }

    /// Where each assigned partition is now (to keep it across a re-assignment).
    fn positions(&self) -> HashMap<i32, Offset> {
        self.consumer
            .position()
            .map(|tpl| {
                tpl.elements()
                    .iter()
                    .filter(|e| matches!(e.offset(), Offset::Offset(_)))
                    .map(|e| (e.partition(), e.offset()))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn on_message(&mut self, msg: &BorrowedMessage<'_>) {
        let partition = msg.partition();
        if let Some(high) = self.catch_up.behind.get(&partition) {
            if msg.offset() + 1 >= *high {
                self.catch_up.behind.remove(&partition);
            }
        }
        let live = self.catch_up.tx.is_none();
        match msg.key().map(std::str::from_utf8) {
            Some(Ok(key)) => {
                let decision = match msg.payload() {
                    None => None,
                    Some(bytes) => match self.codec.decode::<BreachDecision>(bytes) {
                        // Versions are the enforcer's clock in microseconds: one far ahead of
                        // ours could never be superseded, so it would pin its key for good.
                        Ok(d) if d.version > crate::clock::now_us().saturating_add(MAX_VERSION_AHEAD_US) => {
                            metrics::decision_ignored("future_version");
                            warn!(
                                key,
                                version = d.version,
                                offset = msg.offset(),
                                "breach decision with a version far in the future; ignored"
                            );
                            return self.after_message();
                        }
                        Ok(d) if d.key() == key => Some(d),
                        Ok(d) => {
                            metrics::decision_ignored("key_mismatch");
                            warn!(key, payload_key = %d.key(), offset = msg.offset(), "breach decision under another key; ignored");
                            return self.after_message();
                        }
                        Err(e) => {
                            metrics::decision_ignored("undecodable");
                            warn!(key, offset = msg.offset(), error = %e, "undecodable breach decision; ignored");
                            return self.after_message();
                        }
                    },
                };
                let state = decision.as_ref().map_or("tombstone", |d| d.state.as_str());
                let decided_at_us = decision.as_ref().map(|d| d.decided_at_us);
                match self.cache.apply(key, decision) {
                    Applied::Stored | Applied::Removed | Applied::Absent => {
                        metrics::decision_applied(state);
                        if let (true, Some(at)) = (live, decided_at_us) {
                            let delay_us = crate::clock::now_us().saturating_sub(at).max(0);
                            metrics::decision_delay(delay_us as f64 / 1e6);
                        }
                        debug!(key, state, "breach decision applied");
                    }
                    Applied::Stale => {
                        metrics::decision_ignored("stale_version");
                        debug!(key, "breach decision with an old version; ignored");
                    }
                }
            }
            _ => {
                metrics::decision_ignored("no_key");
                warn!(offset = msg.offset(), partition, "breach decision without a UTF-8 key; ignored");
            }
        }
        self.after_message();
    }

    fn after_message(&mut self) {
        if self.catch_up.tx.is_some() && self.catch_up.behind.is_empty() {
            self.caught_up();
        }
    }
}

/// The decision follower's consumer: it never joins or commits (a group id only keeps
/// librdkafka's consumer queue in use), and fetches with the quiet or the active wait.
fn follower_config(brokers: &str, quiet: bool, extra: &[(String, String)]) -> ClientConfig {
    let settings = [
        ("group.id", "tollgate-ingress-decisions"),
        ("client.id", "tollgate-ingress-decisions"),
        ("enable.auto.commit", "false"),
        ("enable.auto.offset.store", "false"),
        ("enable.partition.eof", "true"),
        ("auto.offset.reset", "earliest"),
        ("fetch.error.backoff.ms", "100"),
        ("reconnect.backoff.max.ms", "2000"),
        // The enforcer publishes inside a transaction it never commits on a broker without
        // EndTxn (Tansu 0.6: enforcer `lease`). Tansu hands those records to every fetch, but
        // answers a `read_committed` end-offset query with the transaction's first offset, so
        // the catch-up at start would stop there, before every decision of the enforcer now
        // active.
        ("isolation.level", "read_uncommitted"),
    ];
    let fetch = Some((tollgate_runtime::kafka::Follow::Decisions, quiet));
    tollgate_runtime::kafka::client_config(brokers, &settings, fetch, extra)
}
