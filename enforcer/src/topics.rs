//! Reading a whole topic once (the compacted breaches topic and the alerts topic at start).

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};

/// Calls `f(key, payload)` for every record of `topic` from the beginning up to the high
/// watermarks read when it starts, in partition order. Blocks: run it on a blocking thread.
pub fn read_to_end(
    brokers: &str,
    extra: &[(String, String)],
    topic: &str,
    deadline: Duration,
    mut f: impl FnMut(Option<&[u8]>, Option<&[u8]>),
) -> anyhow::Result<u64> {
    let settings =
        [("group.id", "tollgate-enforcer-replay"), ("enable.auto.commit", "false"), ("enable.partition.eof", "false")];
    let fetch = Some((tollgate_runtime::kafka::Follow::History, false));
    let cc = tollgate_runtime::kafka::client_config(brokers, &settings, fetch, extra);
    let consumer: BaseConsumer = cc.create().context("creating a replay consumer")?;
    let started = Instant::now();
    let left = || deadline.saturating_sub(started.elapsed()).max(Duration::from_millis(1));
    let md = consumer.fetch_metadata(Some(topic), left()).with_context(|| format!("reading metadata of {topic}"))?;
    let partitions = tollgate_runtime::partitions_in(&md, topic);
    if partitions.is_empty() {
        bail!("topic {topic} does not exist or has no partitions");
    }
    let mut ends = Vec::new();
    let mut tpl = TopicPartitionList::new();
    for p in &partitions {
        let (low, high) =
            consumer.fetch_watermarks(topic, *p, left()).with_context(|| format!("reading the end of {topic}/{p}"))?;
        if high > low {
            ends.push((*p, high));
            tpl.add_partition_offset(topic, *p, Offset::Offset(low))?;
        }
    }
    if ends.is_empty() {
        return Ok(0);
    }
    consumer.assign(&tpl)?;
    let mut read = 0u64;
    let mut positions: Vec<(i32, i64)> = ends.iter().map(|(p, _)| (*p, -1)).collect();
    while positions.iter().zip(&ends).any(|((_, at), (_, end))| *at + 1 < *end) {
        if started.elapsed() > deadline {
            bail!("reading {topic} took longer than {deadline:?}");
        }
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                f(m.key(), m.payload());
                read += 1;
                if let Some(pos) = positions.iter_mut().find(|(p, _)| *p == m.partition()) {
                    pos.1 = m.offset();
                }
            }
            Some(Err(e)) => tracing::warn!(%topic, error = %e, "error while replaying"),
            None => {}
        }
    }
    Ok(read)
}
