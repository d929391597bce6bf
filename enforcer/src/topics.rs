//! Reading a whole topic once (the compacted breaches topic and the alerts topic at start).

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};

/// Calls `f(key, payload)` for every record of `topic` from the beginning up to its end, in
/// partition order; returns where each partition's reading ended, where a follower goes on
/// from. Blocks: run it on a blocking thread.
pub fn read_to_end(
    brokers: &str,
    extra: &[(String, String)],
    topic: &str,
    deadline: Duration,
    mut f: impl FnMut(Option<&[u8]>, Option<&[u8]>),
) -> anyhow::Result<Vec<(i32, i64)>> {
    read_range(brokers, extra, topic, None, deadline, |m| f(m.key(), m.payload()))
}

/// Reads `topic` from `from` (each partition's offset; `None`: every partition from its
/// beginning) to the end, handing each record to `f`; returns each partition's next offset.
///
/// The end is the partition's end-of-file event, not the last record's offset: a takeover's
/// abort marker (`lease`) takes the last offset of a partition and is never handed over, so a
/// reader waiting for a record at that offset would wait forever. Blocks.
pub fn read_range(
    brokers: &str,
    extra: &[(String, String)],
    topic: &str,
    from: Option<&[(i32, i64)]>,
    deadline: Duration,
    mut f: impl FnMut(&rdkafka::message::BorrowedMessage<'_>),
) -> anyhow::Result<Vec<(i32, i64)>> {
    let settings = [
        ("group.id", "tollgate-enforcer-replay"),
        ("enable.auto.commit", "false"),
        ("enable.partition.eof", "true"),
        // The active's transaction is never committed on a broker without EndTxn (`lease`).
        ("isolation.level", "read_uncommitted"),
    ];
    // Reading to the end takes a fetch wait per round on Tansu: a short one.
    let fetch = Some((tollgate_runtime::kafka::Follow::Usage, false));
    let cc = tollgate_runtime::kafka::client_config(brokers, &settings, fetch, extra);
    let consumer: BaseConsumer<EndIsNoError> =
        cc.create_with_context(EndIsNoError).context("creating a replay consumer")?;
    let started = Instant::now();
    let left = || deadline.saturating_sub(started.elapsed()).max(Duration::from_millis(1));
    let starts: Vec<(i32, Option<i64>)> = match from {
        Some(f) => f.iter().map(|(p, at)| (*p, Some(*at))).collect(),
        None => {
            let md =
                consumer.fetch_metadata(Some(topic), left()).with_context(|| format!("reading metadata of {topic}"))?;
            let partitions = tollgate_runtime::partitions_in(&md, topic);
            if partitions.is_empty() {
                bail!("topic {topic} does not exist or has no partitions");
            }
            partitions.into_iter().map(|p| (p, None)).collect()
        }
    };
    // Per partition: the next offset, and whether its end was reached.
    let mut next: Vec<(i32, i64, bool)> = Vec::new();
    let mut tpl = TopicPartitionList::new();
    for (p, at) in starts {
        let (low, high) =
            consumer.fetch_watermarks(topic, p, left()).with_context(|| format!("reading the end of {topic}/{p}"))?;
        let at = at.unwrap_or(low).max(low);
        if at >= high {
            // Nothing to read now (what comes later, a follower reads).
            next.push((p, at, true));
        } else {
            // Past its end-of-file event the position is at least `high`, markers included.
            next.push((p, high, false));
            tpl.add_partition_offset(topic, p, Offset::Offset(at))?;
        }
    }
    if next.iter().all(|(_, _, done)| *done) {
        return Ok(next.into_iter().map(|(p, at, _)| (p, at)).collect());
    }
    consumer.assign(&tpl)?;
    while next.iter().any(|(_, _, done)| !done) {
        if started.elapsed() > deadline {
            bail!("reading {topic} took longer than {deadline:?}");
        }
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                f(&m);
                if let Some(n) = next.iter_mut().find(|(p, _, _)| *p == m.partition()) {
                    n.1 = n.1.max(m.offset() + 1);
                }
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                if let Some(n) = next.iter_mut().find(|(q, _, _)| *q == p) {
                    n.2 = true;
                }
            }
            Some(Err(e)) => tracing::warn!(%topic, error = %e, "error while reading"),
            None => {}
        }
    }
    Ok(next.into_iter().map(|(p, at, _)| (p, at)).collect())
}

/// A reader's context for which a partition's end is news, not an error: librdkafka also reports
/// `enable.partition.eof` events as client errors, which the default context logs at error level.
struct EndIsNoError;

impl rdkafka::ClientContext for EndIsNoError {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        // librdkafka reports the end of a partition as a global error too (`Global(PartitionEOF)`).
        let end = matches!(error, rdkafka::error::KafkaError::PartitionEOF(_))
            || error.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::PartitionEOF);
        if !end {
            tracing::error!(error = %error, reason, "kafka client error");
        }
    }
}

impl rdkafka::consumer::ConsumerContext for EndIsNoError {}

/// A standby's reader of the active enforcer's output (the breaches, alerts and lease topics),
/// from where the start-up replay ended, so its engine knows what was published and alerted and
/// when the active last gave a sign of life.
pub struct Follower {
    consumer: std::sync::Arc<rdkafka::consumer::StreamConsumer>,
    /// The next offset to read of each (topic, partition) followed.
    next: std::collections::BTreeMap<(String, i32), i64>,
}

impl Follower {
    /// Follows each `(topic, partition)` from its offset.
    pub fn new(brokers: &str, extra: &[(String, String)], from: &[(String, i32, i64)]) -> anyhow::Result<Follower> {
        let settings = [
            ("group.id", "tollgate-enforcer-standby"),
            ("enable.auto.commit", "false"),
            ("enable.partition.eof", "false"),
            // The active's transaction is never committed on a broker without EndTxn (`lease`).
            ("isolation.level", "read_uncommitted"),
        ];
        // A standby needs the active's output only by the time it takes over, and it catches up
        // then: the quiet wait keeps an idle standby cheap for the broker.
        let fetch = Some((tollgate_runtime::kafka::Follow::Usage, true));
        let cc = tollgate_runtime::kafka::client_config(brokers, &settings, fetch, extra);
        let consumer: rdkafka::consumer::StreamConsumer = cc.create().context("creating the standby's follower")?;
        let mut tpl = TopicPartitionList::new();
        let mut next = std::collections::BTreeMap::new();
        for (topic, p, at) in from {
            tpl.add_partition_offset(topic, *p, Offset::Offset(*at))?;
            next.insert((topic.clone(), *p), *at);
        }
        consumer.assign(&tpl).context("assigning the followed topics")?;
        Ok(Follower { consumer: std::sync::Arc::new(consumer), next })
    }

    /// The next record; `Err` is a consumer error (logged by the caller, which goes on).
    pub async fn recv(&mut self) -> Result<Followed, rdkafka::error::KafkaError> {
        let m = self.consumer.recv().await?;
        self.next.insert((m.topic().to_owned(), m.partition()), m.offset() + 1);
        Ok(Followed::of(&m))
    }

    /// The next offset of each partition of `topic` followed.
    pub fn positions(&self, topic: &str) -> Vec<(i32, i64)> {
        self.next.iter().filter(|((t, _), _)| t == topic).map(|((_, p), at)| (*p, *at)).collect()
    }

    /// Reads every followed partition up to its end as the broker reports it now (called after
    /// taking over, when nobody else can write any more), handing each record to `f`. The
    /// follower's own consumer is not used again after this.
    pub async fn catch_up(
        &mut self,
        brokers: &str,
        extra: &[(String, String)],
        deadline: Duration,
        mut f: impl FnMut(Followed),
    ) -> anyhow::Result<u64> {
        let mut by_topic: std::collections::BTreeMap<String, Vec<(i32, i64)>> = std::collections::BTreeMap::new();
        for ((t, p), at) in &self.next {
            by_topic.entry(t.clone()).or_default().push((*p, *at));
        }
        let mut read = 0;
        for (topic, from) in by_topic {
            let (brokers, extra, t) = (brokers.to_owned(), extra.to_vec(), topic.clone());
            let (records, ends) = tokio::task::spawn_blocking(move || {
                let mut records = Vec::new();
                let ends = read_range(&brokers, &extra, &t, Some(&from), deadline, |m| {
                    records.push(Followed::of(m));
                })?;
                anyhow::Ok((records, ends))
            })
            .await
            .context("the catch-up thread failed")??;
            for (p, at) in ends {
                self.next.insert((topic.clone(), p), at);
            }
            read += records.len() as u64;
            records.into_iter().for_each(&mut f);
        }
        Ok(read)
    }
}

/// One record a [`Follower`] read.
pub struct Followed {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub timestamp_ms: Option<i64>,
}

impl Followed {
    fn of(m: &rdkafka::message::BorrowedMessage<'_>) -> Followed {
        Followed {
            topic: m.topic().to_owned(),
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().map(<[u8]>::to_vec),
            timestamp_ms: m.timestamp().to_millis(),
        }
    }
}
