//! Publishes usage events to Kafka off the request path, through a write-ahead spool on disk.
//!
//! The request path hands each event to a bounded in-memory queue and never waits. One task
//! takes events from the queue, appends each to the [`Spool`] (one `write`, no fsync), and
//! produces spooled records to Kafka in spool order. A record leaves the spool only once Kafka
//! has acknowledged it (`acks=all`, idempotent producer), so:
//!
//! - **Broker away.** Deliveries fail after `message.timeout.ms` (10 s). At the first failure
//!   the task stops taking records from the spool and purges the producer's queue, so every
//!   outstanding delivery settles at once; it then replaces the producer with a new one,
//!   rewinds to the lowest unacknowledged record, waits (0.5 s doubling to 30 s, counted from
//!   the start of the failed attempt), and sends that one record alone as a probe. When the
//!   probe is acknowledged it sends everything after it, in order. Requests keep being served
//!   and their events keep being spooled, up to the spool's bound.
//!
//!   Why a new producer: after a message timeout an idempotent librdkafka producer bumps its
//!   own epoch and keeps sending with it. Every record is in the spool anyway, so a fresh
//!   producer session per attempt is simpler to reason about than the old session's state;
//!   and Tansu 0.6's SQLite storage panics on a produce with an epoch it did not hand out,
//!   which leaves that broker unable to serve anything until it restarts.
//! - **Ingress restarted.** Records an earlier run left in the spool are sent first, in order.
//! - **Graceful shutdown.** Intake stops, the spool is drained to Kafka within a deadline, and
//!   the spool head is persisted; what remains is sent by the next start.
//! - **`kill -9`.** Events already appended are in the page cache and survive; events still
//!   in the in-memory queue between `publish` and the task's append are lost. That window is
//!   the last moment before the kill: measured at 0–2 answered requests per kill under
//!   ~300 requests/s (debug build, 2 cores; `tests/tests/ingress_kill.rs`, ignored test).
//!   Records acknowledged since the head was last persisted (every 0.5 s) are sent again.
//!
//! Re-sending after an ambiguous failure can duplicate an event in Kafka; the meter's table
//! collapses on event id. Every event that is dropped instead (full queue, full spool, disk
//! error, a record Kafka refuses for good) is counted in `tollgate_ingress_events_dropped_total`
//! by reason and logged.

use std::fmt::Display;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message as _;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer as _, ProducerContext, PurgeConfig};
use rdkafka::{ClientConfig, ClientContext};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tollgate_schemas::avro::AvroCodec;
use tollgate_schemas::usage::UsageEvent;
use tracing::{debug, error, info, warn};

use crate::intake::{self, Hold, Journal};
use crate::metrics;
use crate::spool::{AppendError, Record, Spool, SpoolOptions};

#[derive(Debug, Clone)]
pub struct KafkaConfig {
    /// `host:port,host:port`
    pub brokers: String,
    pub usage_topic: String,
    /// Extra librdkafka settings (`security.protocol`, `sasl.*`, …), applied last.
    pub extra: Vec<(String, String)>,
}

/// Where and how much usage events are spooled on disk before Kafka acknowledges them.
#[derive(Debug, Clone)]
pub struct SpoolConfig {
    /// Directory of the spool; one ingress process per directory (a lock file enforces it).
    pub dir: PathBuf,
    /// Most bytes the spool may hold; events past it are dropped (counted and logged).
    pub max_bytes: u64,
    /// Size at which a spool segment file is closed and a new one begun.
    pub segment_bytes: u64,
    /// How long a graceful shutdown may spend sending the spool to Kafka.
    pub drain_timeout: Duration,
    /// Most bytes the intake journal (`dir/intake`) may hold.
    pub intake_max_bytes: u64,
}

impl SpoolConfig {
    pub fn new(dir: PathBuf, max_bytes: u64) -> Self {
        Self {
            dir,
            max_bytes,
            segment_bytes: SpoolOptions::new(max_bytes).segment_bytes,
            drain_timeout: DRAIN_TIMEOUT,
            intake_max_bytes: INTAKE_MAX_BYTES,
        }
    }
}

/// Records handed to librdkafka and not yet settled, at most.
const MAX_IN_FLIGHT: usize = 10_000;
/// Events taken from the queue per wake-up.
const INTAKE_BATCH: usize = 1024;
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How often the spool head is persisted and the spool gauges are updated.
const HOUSEKEEPING_EVERY: Duration = Duration::from_millis(500);
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Default bound of the intake journal: ~1 KiB per attempt, so 256 MiB holds a 10-minute
/// stream's worth of journal at ~400 requests/s.
pub const INTAKE_MAX_BYTES: u64 = 256 << 20;
/// After one logged drop, further drops within this window are summed into one line.
const DROP_LOG_EVERY: Duration = Duration::from_secs(10);

/// Handle the request path uses; cloning is cheap.
#[derive(Clone)]
pub struct Publisher {
    tx: mpsc::Sender<Queued>,
    journal: Arc<Journal>,
}

/// An event for the spool, with the intake record it completes (dropped once it is spooled).
type Queued = (UsageEvent, Option<Hold>);

/// The producer task; `shutdown` stops intake, drains the spool within the deadline, and
/// persists what is left for the next start.
pub struct PublisherTask {
    handle: JoinHandle<()>,
    stop: CancellationToken,
}

impl Publisher {
    /// Opens the spool (recovering what an earlier run left), builds the idempotent producer
    /// (`acks=all`) and starts its task. Fails if the spool directory cannot be used.
    pub fn start(cfg: &KafkaConfig, capacity: usize, spool: SpoolConfig) -> anyhow::Result<(Publisher, PublisherTask)> {
        let settings = [
            ("enable.idempotence", "true"),
            ("acks", "all"),
            // Events wait up to 10 ms to share a produce request: fewer, larger batches cost
            // the broker thread less per event, and 10 ms is small beside the enforcer's
            // 250 ms budget from usage to decision.
            ("linger.ms", "10"),
            // Uncompressed: at 10 ms of linger a batch holds a few dozen ~600-byte events, and
            // LZ4's per-batch set-up cost the ingress ~15% of its CPU per request on a loaded
            // 2-core machine (tests/bench/profile). `--kafka-option compression.type=lz4` for
            // links where bytes cost more than CPU.
            ("compression.type", "none"),
            // Failures surface within seconds, so the spool takes over instead of memory.
            ("message.timeout.ms", "10000"),
        ];
        let cc = tollgate_runtime::kafka::client_config(&cfg.brokers, &settings, None, &cfg.extra);
        let (delivered_tx, delivered) = mpsc::unbounded_channel();
        let producer = new_producer(&cc, &delivered_tx)?;
        let codec = Arc::new(UsageEvent::codec()?);
        let opts = SpoolOptions { max_bytes: spool.max_bytes, segment_bytes: spool.segment_bytes };
        let (store, recovery) = Spool::open(&spool.dir, opts)
            .map_err(|e| anyhow::anyhow!("opening the usage event spool in {}: {e}", spool.dir.display()))?;
        if recovery.records > 0 {
            info!(records = recovery.records, dir = %spool.dir.display(), "resending usage events left in the spool by an earlier run");
            metrics::events_recovered(recovery.records);
        }
        if recovery.lost_records > 0 {
            metrics::events_dropped("spool_corrupt", recovery.lost_records);
            error!(records = recovery.lost_records, dir = %spool.dir.display(), "usage events lost: spool segments were corrupt");
        }
        let intake_dir = spool.dir.join(intake::DIR);
        let (journal, leftover) = Journal::open(&intake_dir, spool.intake_max_bytes)
            .map_err(|e| anyhow::anyhow!("opening the intake journal in {}: {e}", intake_dir.display()))?;
        let sent_below = store.head();
        let mut task = Task {
            spool: store,
            kafka: producer,
            client_config: cc,
            delivered_tx,
            in_flight: 0,
            codec,
            topic: cfg.usage_topic.clone(),
            mode: Mode::Open,
            backoff: BACKOFF_MIN,
            attempt_started: Instant::now(),
            outage_since: None,
            held: None,
            sent_below,
            drops: DropLog::default(),
            journal: None,
        };
        // Attempts the last run never finished: their interrupted events go to the spool first.
        if !leftover.events.is_empty() || leftover.undecodable > 0 {
            warn!(
                attempts = leftover.events.len(),
                "recording attempts an earlier run left with a provider as interrupted (input estimated)"
            );
            metrics::intake_interrupted(leftover.events.len() as u64);
            metrics::events_dropped("intake_undecodable", leftover.undecodable);
            let mut batch: Vec<Queued> = leftover.events.iter().cloned().map(|e| (e, None)).collect();
            task.intake_batch(&mut batch);
        }
        journal.settle_leftover(&leftover);
        task.journal = Some(journal.clone());
        task.gauges();
        let (tx, rx) = mpsc::channel(capacity);
        let stop = CancellationToken::new();
        let handle = tokio::spawn(task.run(rx, delivered, stop.clone(), spool.drain_timeout));
        Ok((Publisher { tx, journal }, PublisherTask { handle, stop }))
    }

    /// Writes an attempt's interrupted event to the intake journal before its upstream call;
    /// the returned hold goes with the attempt's real event to [`Publisher::publish`].
    pub fn begin(&self, interrupted: &UsageEvent) -> Option<Hold> {
        self.journal.begin(interrupted)
    }

    /// Queues an event; never waits. A full queue drops the event, counted and logged. `hold`
    /// is the attempt's intake, completed once the event is in the spool.
    pub fn publish(&self, event: UsageEvent, hold: Option<Hold>) {
        match self.tx.try_send((event, hold)) {
            Ok(()) => metrics::publish_queue_depth(self.tx.max_capacity() - self.tx.capacity()),
            Err(mpsc::error::TrySendError::Full((ev, _))) => {
                metrics::event_dropped("queue_full");
                error!(event_id = %ev.event_id, "usage event dropped: publish queue full");
            }
            Err(mpsc::error::TrySendError::Closed((ev, _))) => {
                metrics::event_dropped("shutting_down");
                error!(event_id = %ev.event_id, "usage event dropped: publisher stopped");
            }
        }
    }
}

impl PublisherTask {
    /// Stops intake (later `publish` calls are counted as dropped), spools what was queued,
    /// sends the spool to Kafka within the drain deadline and persists the spool head.
    pub async fn shutdown(self) {
        self.stop.cancel();
        if let Err(e) = self.handle.await {
            error!(error = %e, "publisher task failed");
        }
    }
}

/// What became of one record handed to librdkafka: its spool sequence number and either its
/// partition and offset or the error.
type Delivery = (u64, Result<(i32, i64), KafkaError>);
/// Deliveries taken from the channel per wake-up.
const SETTLE_BATCH: usize = 4096;

/// librdkafka's delivery callback (on the producer's polling thread) sends each outcome into a
/// channel the task reads in batches. The opaque is the spool sequence number, so a record in
/// flight costs no allocation and no future of its own.
struct Deliveries {
    tx: mpsc::UnboundedSender<Delivery>,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, seq: usize) {
        let outcome = match result {
            Ok(m) => Ok((m.partition(), m.offset())),
            Err((e, _)) => Err(e.clone()),
        };
        // The receiver is gone only when the task has ended, and then nothing waits for it.
        let _ = self.tx.send((seq as u64, outcome));
    }
}

type Kafka = tollgate_runtime::kafka::Producer<Deliveries>;

fn new_producer(cc: &ClientConfig, tx: &mpsc::UnboundedSender<Delivery>) -> rdkafka::error::KafkaResult<Kafka> {
    tollgate_runtime::kafka::Producer::new(cc, Deliveries { tx: tx.clone() })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Kafka is taking records: send everything in the spool, up to `MAX_IN_FLIGHT`.
    Open,
    /// A delivery failed: send nothing new until what is in flight has settled.
    Settling,
    /// Waiting before the next attempt.
    Backoff { until: Instant },
    /// One record (the lowest unacknowledged) is on its way to see if Kafka is back.
    Probing,
}

struct Task {
    spool: Spool,
    kafka: Kafka,
    client_config: ClientConfig,
    delivered_tx: mpsc::UnboundedSender<Delivery>,
    /// Records handed to librdkafka whose delivery has not been reported yet.
    in_flight: usize,
    codec: Arc<AvroCodec>,
    topic: String,
    mode: Mode,
    backoff: Duration,
    attempt_started: Instant,
    outage_since: Option<Instant>,
    /// A record librdkafka refused because its queue was full; sent before reading on.
    held: Option<Record>,
    /// Records below this sequence number were sent before (by this run or, if still in the
    /// spool, by an earlier one): sending them again counts as a resend.
    sent_below: u64,
    drops: DropLog,
    /// The intake journal, whose head is persisted with the spool's.
    journal: Option<Arc<Journal>>,
}

impl Task {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Queued>,
        mut delivered: mpsc::UnboundedReceiver<Delivery>,
        stop: CancellationToken,
        drain_timeout: Duration,
    ) {
        let mut batch = Vec::with_capacity(INTAKE_BATCH);
        let mut settled = Vec::with_capacity(SETTLE_BATCH);
        let mut tick = tokio::time::interval(HOUSEKEEPING_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.fill();
            let retry_at = self.retry_at();
            // Intake first: an event is safe from a crash only once it is in the spool.
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                n = rx.recv_many(&mut batch, INTAKE_BATCH) => {
                    if n == 0 {
                        break;
                    }
                    self.intake_batch(&mut batch);
                }
                n = delivered.recv_many(&mut settled, SETTLE_BATCH), if self.in_flight > 0 => self.settle_batch(n, &mut settled),
                () = sleep_until(retry_at) => self.probe(),
                _ = tick.tick() => self.housekeeping(),
            }
            self.after_settle();
        }

        // Shutdown: take what is queued, then drain the spool to Kafka within the deadline.
        rx.close();
        while let Ok(ev) = rx.try_recv() {
            batch.push(ev);
        }
        self.intake_batch(&mut batch);
        let deadline = Instant::now() + drain_timeout;
        loop {
            self.fill();
            if self.in_flight == 0 && self.spool.pending_records() == 0 {
                break;
            }
            let retry_at = self.retry_at();
            tokio::select! {
                biased;
                n = delivered.recv_many(&mut settled, SETTLE_BATCH), if self.in_flight > 0 => self.settle_batch(n, &mut settled),
                () = sleep_until(retry_at) => self.probe(),
                () = tokio::time::sleep_until(deadline) => break,
            }
            self.after_settle();
        }
        self.housekeeping();
        self.drops.flush();
        let left = self.spool.pending_records();
        if left > 0 {
            warn!(
                records = left,
                in_flight = self.in_flight,
                "usage events left in the spool at shutdown; the next start sends them"
            );
        } else {
            info!("usage event spool drained");
        }
        // Dropping the producer purges what is still queued in librdkafka; those records are
        // still in the spool (a delivery that raced this is a duplicate the meter collapses).
        drop(self.kafka);
    }

    /// Encodes each event and appends it to the spool; empties `batch`.
    fn intake_batch(&mut self, batch: &mut Vec<Queued>) {
        let mut spooled = 0;
        // Each hold is dropped (its intake completed) right after its event's append.
        for (ev, _hold) in batch.drain(..) {
            spooled += u64::from(self.intake(&ev));
        }
        metrics::events_spooled(spooled);
    }

    /// Encodes an event and appends it to the spool; whether it is there.
    fn intake(&mut self, ev: &UsageEvent) -> bool {
        let payload = match self.codec.encode(ev) {
            Ok(p) => p,
            Err(e) => {
                self.drops.dropped("encode", &ev.event_id, &e);
                return false;
            }
        };
        // Key by session so one session's events stay ordered in one partition.
        let key = ev.envelope.session_id.as_deref().unwrap_or(&ev.event_id);
        match self.spool.append(key.as_bytes(), &payload) {
            Ok(_) => return true,
            Err(e @ AppendError::Full { .. }) => self.drops.dropped("spool_full", &ev.event_id, &e),
            Err(e @ AppendError::TooLarge(_)) => self.drops.dropped("too_large", &ev.event_id, &e),
            Err(e @ AppendError::Io(_)) => self.drops.dropped("spool_io", &ev.event_id, &e),
        }
        false
    }

    /// Hands spooled records to librdkafka, in order, as far as the mode allows.
    fn fill(&mut self) {
        let limit = match self.mode {
            Mode::Open => MAX_IN_FLIGHT,
            Mode::Probing => 1,
            Mode::Settling | Mode::Backoff { .. } => return,
        };
        while self.in_flight < limit {
            let rec = match self.held.take() {
                Some(r) => r,
                None => match self.spool.read_next() {
                    Ok(Some(r)) => r,
                    Ok(None) => return,
                    Err(e) => {
                        error!(error = %e, "cannot read the usage event spool");
                        self.failed(&e);
                        return;
                    }
                },
            };
            let Ok(opaque) = usize::try_from(rec.seq) else {
                // Only on a target whose usize is narrower than a spool sequence number.
                self.reject(rec.seq, &KafkaError::MessageProduction(RDKafkaErrorCode::InvalidArgument));
                continue;
            };
            let record = BaseRecord::with_opaque_to(&self.topic, opaque).key(&rec.key[..]).payload(&rec.payload[..]);
            match self.kafka.send(record).map_err(|(e, _)| e) {
                Ok(()) => {
                    if rec.seq < self.sent_below {
                        metrics::event_resent();
                    } else {
                        self.sent_below = rec.seq + 1;
                    }
                    self.in_flight += 1;
                }
                Err(KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)) => {
                    // librdkafka's own buffer is full: wait for deliveries.
                    self.held = Some(rec);
                    return;
                }
                Err(e) if refused_for_good(&e) => self.reject(rec.seq, &e),
                Err(e) => {
                    self.held = Some(rec);
                    self.failed(&e);
                    return;
                }
            }
        }
    }

    /// Settles the `n` deliveries in `settled` and empties it.
    fn settle_batch(&mut self, n: usize, settled: &mut Vec<Delivery>) {
        self.in_flight = self.in_flight.saturating_sub(n);
        let mut published = 0;
        for (seq, res) in settled.drain(..) {
            published += u64::from(self.settle(seq, res));
        }
        metrics::events_published(published);
    }

    /// Settles one delivery; whether Kafka took the record.
    fn settle(&mut self, seq: u64, res: Result<(i32, i64), KafkaError>) -> bool {
        match res {
            Ok((partition, offset)) => {
                debug!(seq, partition, offset, "usage event published");
                if let Err(e) = self.spool.ack(seq) {
                    warn!(error = %e, "usage event spool not trimmed");
                }
                if self.mode == Mode::Probing {
                    self.mode = Mode::Open;
                    self.backoff = BACKOFF_MIN;
                    if let Some(since) = self.outage_since.take() {
                        info!(
                            outage_secs = since.elapsed().as_secs(),
                            spooled = self.spool.pending_records(),
                            "kafka takes usage events again; sending the spool"
                        );
                    }
                }
                return true;
            }
            Err(e) if refused_for_good(&e) => self.reject(seq, &e),
            Err(e) => self.failed(&e),
        }
        false
    }

    /// Kafka will never take this record (too large, invalid): drop it, counted and logged.
    fn reject(&mut self, seq: u64, e: &KafkaError) {
        self.drops.dropped("rejected", &format!("spool#{seq}"), e);
        if let Err(e) = self.spool.ack(seq) {
            warn!(error = %e, "usage event spool not trimmed");
        }
    }

    fn failed(&mut self, e: &dyn Display) {
        metrics::delivery_failed();
        match self.mode {
            Mode::Open | Mode::Probing => {
                if self.outage_since.is_none() {
                    self.outage_since = Some(Instant::now());
                    warn!(
                        error = %e,
                        spooled = self.spool.pending_records(),
                        "usage events not delivered to kafka; spooling them on disk until it is back"
                    );
                } else {
                    debug!(error = %e, "kafka probe failed");
                }
                self.mode = Mode::Settling;
                // Fail what this producer still holds now rather than one timeout at a time;
                // it is all in the spool and is sent again by the next producer.
                self.kafka.purge(PurgeConfig::default().queue().inflight());
            }
            Mode::Settling | Mode::Backoff { .. } => debug!(error = %e, "usage event delivery failed"),
        }
    }

    /// Once a failed attempt has settled: rewind to the lowest unacknowledged record, start a
    /// new producer session, and back off.
    fn after_settle(&mut self) {
        if self.mode != Mode::Settling || self.in_flight > 0 {
            return;
        }
        self.held = None;
        if let Err(e) = self.spool.rewind() {
            error!(error = %e, "cannot rewind the usage event spool");
        }
        if let Some((code, reason)) = self.kafka.client().fatal_error() {
            warn!(?code, %reason, "kafka producer hit a fatal error");
        }
        match new_producer(&self.client_config, &self.delivered_tx) {
            Ok(fresh) => {
                let old = std::mem::replace(&mut self.kafka, fresh);
                // Dropping a producer joins its threads: keep that off the async workers.
                tokio::task::spawn_blocking(move || drop(old));
            }
            Err(e) => error!(error = %e, "cannot create a new kafka producer; retrying with the old one"),
        }
        let until = (self.attempt_started + self.backoff).max(Instant::now());
        debug!(retry_in_ms = (until - Instant::now()).as_millis() as u64, "usage event delivery backing off");
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        self.mode = Mode::Backoff { until };
    }

    fn retry_at(&self) -> Option<Instant> {
        match self.mode {
            Mode::Backoff { until } => Some(until),
            _ => None,
        }
    }

    fn probe(&mut self) {
        self.mode = Mode::Probing;
        self.attempt_started = Instant::now();
    }

    fn housekeeping(&mut self) {
        if let Err(e) = self.spool.persist_head() {
            warn!(error = %e, "usage event spool head not persisted");
        }
        if let Some(j) = &self.journal {
            j.housekeeping();
        }
        self.drops.tick();
        self.gauges();
    }

    fn gauges(&self) {
        metrics::spool_depth(self.spool.pending_records(), self.spool.disk_bytes());
    }
}

/// Errors no retry can fix for this record.
fn refused_for_good(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::InvalidMessage
                | RDKafkaErrorCode::InvalidRecord
        )
    )
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Counts every drop; logs the first of a burst with its event id and sums the rest.
#[derive(Default)]
struct DropLog {
    since: Option<Instant>,
    suppressed: u64,
}

impl DropLog {
    fn dropped(&mut self, reason: &'static str, event_id: &str, error: &dyn Display) {
        metrics::event_dropped(reason);
        let now = Instant::now();
        match self.since {
            Some(t) if now - t < DROP_LOG_EVERY => self.suppressed += 1,
            _ => {
                self.flush();
                error!(reason, event_id, %error, "usage event dropped");
                self.since = Some(now);
            }
        }
    }

    fn tick(&mut self) {
        if self.since.is_some_and(|t| t.elapsed() >= DROP_LOG_EVERY) {
            self.flush();
            self.since = None;
        }
    }

    fn flush(&mut self) {
        if self.suppressed > 0 {
            error!(
                count = self.suppressed,
                "more usage events dropped (by reason in tollgate_ingress_events_dropped_total)"
            );
            self.suppressed = 0;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn event(i: u64) -> UsageEvent {
        UsageEvent {
            started_at_us: 1,
            input_tokens: 10,
            output_tokens: 5,
            input_chars: 40,
            cost_nanos: 1234,
            ..UsageEvent::example(format!("ev-{i}"), Some(format!("s-{i}")), 2)
        }
    }

    /// Nothing listens on the broker address: every event stays in the spool, in order, across
    /// a shutdown whose drain deadline passes, and the next start finds them all.
    #[tokio::test]
    async fn events_wait_in_the_spool_while_kafka_is_unreachable() {
        let dir = tempfile::tempdir().unwrap();
        let kafka = KafkaConfig { brokers: "127.0.0.1:1".into(), usage_topic: "t".into(), extra: vec![] };
        let mut spool = SpoolConfig::new(dir.path().to_path_buf(), 1 << 20);
        spool.drain_timeout = Duration::from_millis(300);
        let (publisher, task) = Publisher::start(&kafka, 16, spool).unwrap();
        for i in 0..10 {
            publisher.publish(event(i), None);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let started = std::time::Instant::now();
        task.shutdown().await;
        assert!(started.elapsed() < Duration::from_secs(5), "shutdown keeps to its drain deadline");
        publisher.publish(event(99), None);

        let (mut reopened, recovery) = Spool::open(dir.path(), SpoolOptions::new(1 << 20)).unwrap();
        assert_eq!(recovery.records, 10);
        let codec = UsageEvent::codec().unwrap();
        for i in 0..10 {
            let rec = reopened.read_next().unwrap().unwrap();
            assert_eq!(rec.key, format!("s-{i}").into_bytes());
            assert_eq!(codec.decode::<UsageEvent>(&rec.payload).unwrap(), event(i));
        }
        assert!(reopened.read_next().unwrap().is_none(), "the event published after shutdown was not spooled");
    }
}
