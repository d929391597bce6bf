//! Alert delivery, driven by the alerts topic: the active enforcer reads the alerts it (or the
//! enforcer before it) published and hands each to the notify channels; how far it has got is
//! written to the lease topic, so the next active goes on from there.
//!
//! - **Nothing skipped.** An alert counts as delivered once each of its channels has finished
//!   (delivered, or given up after its retries); delivery resumes from the first alert not
//!   finished, so an alert published just before a crash is delivered by the next active.
//! - **Nothing delivered twice by two enforcers.** Before a delivery starts, a lease record is
//!   written through the fenced producer: an enforcer that lost the lease (paused, partitioned
//!   away) fails there and delivers nothing.
//! - **In flight at a crash.** A delivery that started and had not finished (or whose end was not
//!   yet written) when the active died is made again by the next active, with the same alert id
//!   in `Idempotency-Key` and `X-Tollgate-Alert-Id` (webhooks) and as PagerDuty's `dedup_key`, so
//!   those receivers keep one; a Slack incoming webhook has no such key and may show it twice.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tollgate_schemas::decision::Alert;
use tracing::{debug, warn};

use crate::lease::{Fenced, Lease};
use crate::notify::Notifier;

/// Alerts handed to the notifier and not finished, at most.
const MAX_IN_FLIGHT: usize = 1_000;

/// The alerts read and not yet finished, per partition, in offset order.
#[derive(Default)]
struct Progress {
    read: VecDeque<(i64, bool)>,
}

impl Progress {
    /// Marks `offset` finished; returns the new delivered-below offset and how many alerts it
    /// passed, when it moved.
    fn finish(&mut self, offset: i64) -> Option<(i64, u64)> {
        if let Some(slot) = self.read.iter_mut().find(|(o, _)| *o == offset) {
            slot.1 = true;
        }
        let mut moved = None;
        while let Some((o, true)) = self.read.front().copied() {
            self.read.pop_front();
            moved = Some((o + 1, moved.map_or(1, |(_, n)| n + 1)));
        }
        moved
    }
}

/// Delivers the alerts of `topic` from `from` (every partition's first offset not delivered)
/// until `stop`, then waits up to `grace` for deliveries in flight. `Err` when the lease was
/// lost: nothing more is delivered.
pub async fn run(
    config: crate::Config,
    from: BTreeMap<i32, i64>,
    lease: Arc<Lease>,
    notifier: Notifier,
    stop: CancellationToken,
    grace: Duration,
) -> Result<(), Fenced> {
    let consumer = match consumer(&config.brokers, &config.kafka_extra, &config.alerts_topic, &from) {
        Ok(c) => c,
        Err(e) => return Err(Fenced(format!("cannot read the alerts topic to deliver: {e:#}"))),
    };
    let codec = Alert::codec().map_err(|e| Fenced(e.to_string()))?;
    let mut progress: BTreeMap<i32, Progress> = BTreeMap::new();
    let mut in_flight: JoinSet<(i32, i64)> = JoinSet::new();
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            Some(done) = in_flight.join_next() => {
                if let Ok((p, o)) = done {
                    finished(&lease, &mut progress, p, o).await?;
                }
            }
            // Bounded, so the notifier's queue (10,000 deliveries) never refuses one of these
            // (a refused delivery would count as finished).
            m = consumer.recv(), if in_flight.len() < MAX_IN_FLIGHT => match m {
                Ok(m) => {
                    let (p, o) = (m.partition(), m.offset());
                    progress.entry(p).or_default().read.push_back((o, false));
                    match m.payload().map(|b| codec.decode::<Alert>(b)) {
                        Some(Ok(alert)) => {
                            // Proof that this enforcer still holds the lease, before anything
                            // leaves for a receiver.
                            while !lease.heartbeat(false).await? {
                                tokio::select! {
                                    () = stop.cancelled() => return Ok(()),
                                    () = tokio::time::sleep(Duration::from_millis(500)) => {}
                                }
                            }
                            let deliveries = notifier.deliver(&alert);
                            debug!(alert = %alert.alert_id, channels = deliveries.started(), "delivering alert");
                            in_flight.spawn(async move {
                                deliveries.finished().await;
                                (p, o)
                            });
                        }
                        other => {
                            warn!(partition = p, offset = o, error = ?other.map(|r| r.err()), "alert record skipped: cannot decode");
                            finished(&lease, &mut progress, p, o).await?;
                        }
                    }
                }
                Err(e) => {
                    warn!(error = %e, "alerts consumer error");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            },
        }
    }
    let deadline = tokio::time::Instant::now() + grace;
    while let Ok(Some(done)) = tokio::time::timeout_at(deadline, in_flight.join_next()).await {
        if let Ok((p, o)) = done {
            finished(&lease, &mut progress, p, o).await?;
        }
    }
    Ok(())
}

/// Records alert `o` of partition `p` finished, and writes the delivered offsets at once when
/// they moved (a crash after this does not deliver it again).
async fn finished(lease: &Lease, progress: &mut BTreeMap<i32, Progress>, p: i32, o: i64) -> Result<(), Fenced> {
    if let Some((next, passed)) = progress.entry(p).or_default().finish(o) {
        lease.set_delivered(p, next);
        // Not written now (a passing failure): the next heartbeat writes it.
        if lease.heartbeat(false).await? {
            crate::metrics::alerts_recorded(passed);
        }
    }
    Ok(())
}

fn consumer(
    brokers: &str,
    extra: &[(String, String)],
    topic: &str,
    from: &BTreeMap<i32, i64>,
) -> anyhow::Result<StreamConsumer> {
    let settings = [
        ("group.id", "tollgate-enforcer-delivery"),
        ("enable.auto.commit", "false"),
        ("enable.partition.eof", "false"),
        ("isolation.level", "read_uncommitted"),
    ];
    // Alerts are not on the request path: the quiet wait keeps the broker idle at rest, and an
    // alert leaves within about a second.
    let fetch = Some((tollgate_runtime::kafka::Follow::Usage, true));
    let cc = tollgate_runtime::kafka::client_config(brokers, &settings, fetch, extra);
    let consumer: StreamConsumer = cc.create().context("creating the alert delivery consumer")?;
    let mut tpl = TopicPartitionList::new();
    for (p, at) in from {
        tpl.add_partition_offset(topic, *p, Offset::Offset(*at))?;
    }
    consumer.assign(&tpl).context("assigning the alerts topic")?;
    Ok(consumer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivered_moves_only_past_a_finished_prefix() {
        let mut p = Progress::default();
        // Offsets 10, 11, 13 read (12 a control record the consumer never hands over).
        for o in [10, 11, 13] {
            p.read.push_back((o, false));
        }
        assert_eq!(p.finish(11), None, "10 is still in flight");
        assert_eq!(p.finish(10), Some((12, 2)));
        assert_eq!(p.finish(13), Some((14, 1)));
        assert!(p.read.is_empty());
    }
}
