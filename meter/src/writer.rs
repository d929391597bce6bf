//! The meter's writer: batches into ClickHouse, one after another, while the consume loop reads
//! the next one.
//!
//! The consume loop hands over each batch with the last offset it read per partition, then goes
//! on reading; the writer takes jobs in the order they were sent, so batches, and the partitions
//! forgotten between them, keep the order the loop saw. At most one batch waits in the channel:
//! a writer slower than the topic holds the loop back instead of piling batches up in memory.

use std::collections::BTreeMap;
use std::sync::Arc;

use clickhouse::Client;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tollgate_store::rows::{CheckpointRow, UsageRow};
use tollgate_store::tables;
use tracing::debug;

use crate::group::MeterContext;
use crate::window::Windows;
use crate::{metrics, retry_clickhouse, sink};

/// Most windows kept in memory before clean ones are dropped (they are re-read on demand).
const MAX_OPEN_WINDOWS: usize = 500_000;
/// How often written windows that ended over `PASSED_GRACE_S` ago are dropped.
const DROP_PASSED_EVERY: std::time::Duration = std::time::Duration::from_secs(60);
const PASSED_GRACE_S: u32 = 600;

/// What the consume loop asks of the writer, done in the order sent.
pub enum Job {
    /// Rows read since the last batch (possibly none) and the last offset read per partition
    /// (decodable or not), which becomes the checkpoint once the rows are written.
    Write { rows: Vec<UsageRow>, last: BTreeMap<i32, i64> },
    /// Drop what memory holds of these partitions: another meter may advance them next.
    Forget(Vec<i32>),
    /// Answered once every job sent before it is done.
    Barrier(oneshot::Sender<()>),
}

/// The consume loop's end of the writer.
pub struct WriterHandle {
    jobs: mpsc::Sender<Job>,
    /// Written batches, emptied, to be filled again: a fresh one of `batch_max_rows` rows is
    /// tens of megabytes that the kernel zeroes page by page on first use (6% of the meter's CPU).
    spares: mpsc::Receiver<Vec<UsageRow>>,
}

impl WriterHandle {
    /// Queues `job`, waiting while the writer holds a batch already (it may be retrying a
    /// ClickHouse that is away); false once the writer has stopped, or when `interrupt` fires
    /// first (the job is then dropped: what it held is read again from the checkpoints).
    pub async fn send(&self, job: Job, interrupt: &CancellationToken) -> bool {
        tokio::select! {
            biased;
            sent = self.jobs.send(job) => sent.is_ok(),
            () = interrupt.cancelled() => false,
        }
    }

    /// An emptied batch to fill, if the writer has one back.
    pub fn spare(&mut self) -> Option<Vec<UsageRow>> {
        self.spares.try_recv().ok()
    }

    /// Waits until every job sent so far is done; false once the writer has stopped or
    /// `interrupt` fired.
    pub async fn drained(&self, interrupt: &CancellationToken) -> bool {
        let (tx, rx) = oneshot::channel();
        if !self.send(Job::Barrier(tx), interrupt).await {
            return false;
        }
        tokio::select! {
            biased;
            done = rx => done.is_ok(),
            () = interrupt.cancelled() => false,
        }
    }
}

/// Starts the writer. It stops when every handle is dropped and the queue is done, or when
/// `stop` interrupts a write; its result says whether it wrote everything it was given.
pub fn spawn(
    ch: Client,
    consumer: Arc<StreamConsumer<MeterContext>>,
    topic: String,
    stop: CancellationToken,
) -> (WriterHandle, tokio::task::JoinHandle<bool>) {
    let (jobs, mut rx) = mpsc::channel(1);
    // One batch being filled, one waiting, one being written: two spares are enough.
    let (give_back, spares) = mpsc::channel(2);
    let mut w = Writer { ch, consumer, topic, windows: Windows::default(), dropped_passed_at: Instant::now() };
    let task = tokio::spawn(async move {
        // Passed windows are dropped after a write, and on this tick while no batch comes: an
        // idle meter lets go of them too.
        let mut idle = tokio::time::interval(DROP_PASSED_EVERY);
        idle.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let job = tokio::select! {
                job = rx.recv() => job,
                _ = idle.tick() => {
                    w.drop_passed_if_due();
                    continue;
                }
            };
            let Some(job) = job else { break };
            match job {
                Job::Write { mut rows, last } => {
                    if !w.write(&rows, &last, &stop).await {
                        return false;
                    }
                    rows.clear();
                    let _ = give_back.try_send(rows);
                }
                Job::Forget(partitions) => {
                    for p in partitions {
                        w.windows.forget(p);
                    }
                }
                Job::Barrier(done) => {
                    let _ = done.send(());
                }
            }
        }
        true
    });
    (WriterHandle { jobs, spares }, task)
}

struct Writer {
    ch: Client,
    consumer: Arc<StreamConsumer<MeterContext>>,
    topic: String,
    windows: Windows,
    dropped_passed_at: Instant,
}

impl Writer {
    /// Writes the batch's raw rows, then its windows, then the checkpoint, each retried while
    /// ClickHouse is away; then records the position in the consumer group. A crash between any
    /// two steps is repaired by the replay from the checkpoint. Returns false when `stop`
    /// interrupted the retries.
    async fn write(&mut self, rows: &[UsageRow], last: &BTreeMap<i32, i64>, stop: &CancellationToken) -> bool {
        let Writer { ch, consumer, topic, windows, .. } = self;
        let ch: &Client = ch;
        let started = Instant::now();
        for r in rows {
            windows.consumed(r.kafka_partition, r.kafka_offset);
        }
        if !rows.is_empty() {
            if retry_clickhouse(stop, "inserting usage rows", || sink::insert(ch, rows)).await.is_none() {
                return false;
            }
            // Re-sent copies of an event count once, at the event's first position.
            let Some(counted) =
                retry_clickhouse(stop, "reading earlier copies", || sink::first_copies(ch, topic, rows)).await
            else {
                return false;
            };
            if retry_clickhouse(stop, "writing event positions", || tollgate_store::insert_positions(ch, rows))
                .await
                .is_none()
            {
                return false;
            }
            metrics::resent(rows.len() - counted.len());
            let batch = windows.batch(counted.iter().copied());
            let missing = windows.missing(&batch);
            if !missing.is_empty() {
                let Some((w, s)) = retry_clickhouse(stop, "reading windows", || sink::load_windows(ch, &missing)).await
                else {
                    return false;
                };
                windows.load(w, s);
            }
            windows.apply(&batch);
            drop(batch);
            let (w, s) = windows.dirty();
            if retry_clickhouse(stop, "writing windows", || tollgate_store::insert_rows(ch, tables::USAGE_WINDOWS, &w))
                .await
                .is_none()
                || retry_clickhouse(stop, "writing session hours", || {
                    tollgate_store::insert_rows(ch, tables::SESSION_HOURS, &s)
                })
                .await
                .is_none()
            {
                return false;
            }
            windows.written();
            metrics::inserted(rows.len(), started.elapsed().as_secs_f64());
            debug!(rows = rows.len(), windows = w.len(), sessions = s.len(), "batch written");
        }
        let marks: Vec<CheckpointRow> = last
            .iter()
            .map(|(p, o)| CheckpointRow {
                topic: topic.clone(),
                kafka_partition: *p,
                next_offset: u64::try_from(o + 1).unwrap_or(0),
            })
            .collect();
        if retry_clickhouse(stop, "writing checkpoints", || {
            tollgate_store::insert_rows(ch, tables::METER_CHECKPOINTS, &marks)
        })
        .await
        .is_none()
        {
            return false;
        }
        let mut tpl = TopicPartitionList::new();
        for (p, o) in last {
            if tpl.add_partition_offset(topic.as_str(), *p, Offset::Offset(o + 1)).is_err() {
                continue;
            }
        }
        if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
            debug!(error = %e, "offset commit failed (informational only)");
        }
        self.drop_passed_if_due();
        metrics::windows_dropped("cap", self.windows.evict(MAX_OPEN_WINDOWS));
        metrics::open_windows(self.windows.len());
        true
    }

    /// Drops the written windows that ended over `PASSED_GRACE_S` ago, at most once per
    /// `DROP_PASSED_EVERY`.
    fn drop_passed_if_due(&mut self) {
        if self.dropped_passed_at.elapsed() < DROP_PASSED_EVERY {
            return;
        }
        self.dropped_passed_at = Instant::now();
        let now_s = u32::try_from(
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        )
        .unwrap_or(u32::MAX);
        metrics::windows_dropped("passed", self.windows.drop_passed(now_s, PASSED_GRACE_S));
        metrics::open_windows(self.windows.len());
    }
}
