//! Consumer-group rebalances, handed from librdkafka's callback to the consume loop.
//!
//! librdkafka runs the rebalance callback inside the consumer poll, that is inside
//! `StreamConsumer::recv` in the consume loop's own task, so it can neither await ClickHouse nor
//! touch the loop's batch. The callback therefore only queues a [`Rebalance`] and returns
//! without calling `assign`/`unassign`; librdkafka's group state machine waits for that call
//! (`WAIT_ASSIGN_CALL` / `WAIT_UNASSIGN_CALL`) and keeps heartbeating meanwhile. The loop then
//! answers it:
//!
//! - **assign**: reads the partitions' checkpoints from ClickHouse and assigns each partition at
//!   its checkpoint, with nothing of it in memory. Not at the group's committed offset: that is
//!   committed after the checkpoint is written, so at best it equals it, and it is lost or stale
//!   whenever a commit fails;
//! - **revoke**: writes the batch read so far (rows, windows, checkpoint: the partitions are
//!   still this meter's until it unassigns), then forgets every row and window of the revoked
//!   partitions and unassigns; a *lost* assignment (the group has already handed the
//!   partitions on) is forgotten without writing.
//!
//! Why a meter that writes a partition it no longer owns is harmless: some brokers (Tansu 0.6)
//! hand a partition to its next owner before the last one has answered its revoke, and a
//! meter that stalls past `max.poll.interval.ms` is dropped from the group mid-flush. Every
//! row such a meter writes is still exact, because each is a snapshot of a contiguous prefix
//! of one partition: a window row holds the absolute totals of its partition's events up to
//! offset `version` (the meter reads a partition contiguously from a checkpoint, and a window
//! it does not hold is loaded from ClickHouse, which covers everything below that checkpoint).
//! Two snapshots of the same window with the same version are equal; `usage_windows` and
//! `session_hours` are `ReplacingMergeTree(version)` on a `UInt64` (numeric, not text, order),
//! read with `FINAL` (`sink::load_windows`, the reports), so the most complete snapshot wins
//! whoever wrote it last and an older one written late never moves a window back. Checkpoints are
//! `ReplacingMergeTree(next_offset)` read as `max(next_offset)`, so a late lower one is ignored,
//! and a higher one is only written after the windows it vouches for. Raw rows written twice
//! collapse on `event_id`. What would not be exact is a meter that keeps a partition's windows
//! in memory across a period in which another meter advanced that partition: hence the
//! forgetting on revoke and on assign (and `Windows::consumed` drops a partition whose offsets
//! jump).

use std::sync::atomic::{AtomicBool, Ordering};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaResult;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, TopicPartitionList};
use tokio::sync::mpsc;
use tracing::warn;

/// A rebalance the consume loop must answer (assign or unassign) before the group moves on.
#[derive(Debug)]
pub enum Rebalance {
    /// Partitions given to this meter: eager protocols name the whole new assignment,
    /// cooperative ones only the added partitions.
    Assign(Vec<i32>),
    /// Partitions taken away: eager protocols name the whole assignment. `lost` when the group
    /// already gave them to another member (session timed out, fenced).
    Revoke { partitions: Vec<i32>, lost: bool },
    /// librdkafka reported a rebalance error: the partitions named are treated as lost.
    Error { partitions: Vec<i32>, error: String },
}

/// The consumer's context: queues rebalances for the consume loop while it runs, and answers
/// them itself (as librdkafka's default would) once the loop has stopped, so closing the
/// consumer can revoke and leave the group.
pub struct MeterContext {
    topic: String,
    events: mpsc::UnboundedSender<Rebalance>,
    loop_stopped: AtomicBool,
}

impl MeterContext {
    pub fn new(topic: &str) -> (Self, mpsc::UnboundedReceiver<Rebalance>) {
        let (events, rx) = mpsc::unbounded_channel();
        (Self { topic: topic.to_owned(), events, loop_stopped: AtomicBool::new(false) }, rx)
    }

    /// From now on the callback answers librdkafka itself. Call once the loop no longer reads
    /// the queue, then answer what it still holds with [`answer_default`].
    pub fn loop_stopped(&self) {
        self.loop_stopped.store(true, Ordering::Release);
    }
}

impl ClientContext for MeterContext {}

impl ConsumerContext for MeterContext {
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        let partitions = partitions_of(tpl, &self.topic);
        let event = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => Rebalance::Assign(partitions),
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                Rebalance::Revoke { partitions, lost: consumer.assignment_lost() }
            }
            other => Rebalance::Error { partitions, error: format!("{other:?}") },
        };
        // Queued unless the loop has stopped (a failed send means its receiver is gone).
        if !self.loop_stopped.load(Ordering::Acquire) && self.events.send(event).is_ok() {
            return;
        }
        let assigning = err == RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS;
        let result = if assigning { assign(consumer, tpl) } else { unassign(consumer, tpl) };
        if let Err(e) = result {
            warn!(error = %e, assigning, "rebalance not applied");
        }
    }
}

/// Answers a queued rebalance as librdkafka's default callback would (assign at the committed
/// offsets, or unassign): for a consumer that is about to close.
pub fn answer_default<C: Consumer<MeterContext>>(consumer: &C, topic: &str, event: &Rebalance) -> KafkaResult<()> {
    match event {
        Rebalance::Assign(partitions) => assign(consumer, &list(topic, partitions)),
        Rebalance::Revoke { partitions, .. } | Rebalance::Error { partitions, .. } => {
            unassign(consumer, &list(topic, partitions))
        }
    }
}

pub fn cooperative<C: Consumer<MeterContext>>(consumer: &C) -> bool {
    matches!(consumer.rebalance_protocol(), RebalanceProtocol::Cooperative)
}

/// Takes `tpl` (with the offsets to start at): the whole assignment under an eager protocol,
/// added partitions under a cooperative one.
pub fn assign<C: Consumer<MeterContext>>(consumer: &C, tpl: &TopicPartitionList) -> KafkaResult<()> {
    if cooperative(consumer) { consumer.incremental_assign(tpl) } else { consumer.assign(tpl) }
}

/// Gives up `tpl` (cooperative) or the whole assignment (eager).
pub fn unassign<C: Consumer<MeterContext>>(consumer: &C, tpl: &TopicPartitionList) -> KafkaResult<()> {
    if cooperative(consumer) { consumer.incremental_unassign(tpl) } else { consumer.unassign() }
}

/// `partitions` of `topic`, at no particular offset.
pub fn list(topic: &str, partitions: &[i32]) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::with_capacity(partitions.len());
    for p in partitions {
        tpl.add_partition(topic, *p);
    }
    tpl
}

fn partitions_of(tpl: &TopicPartitionList, topic: &str) -> Vec<i32> {
    tpl.elements_for_topic(topic).iter().map(|e| e.partition()).collect()
}
