//! Which of the enforcers of one group publishes: one active, the others standing by warm.
//!
//! **Fencing is Kafka's.** Every enforcer of a group publishes through a transactional producer
//! with the same `transactional.id` (the lease name: `group/breaches topic`). Taking over calls
//! `init_transactions`, which bumps the producer epoch at the broker: from then on every write of
//! the previous active (a process resumed from a pause, a node back from a partition) is refused
//! with `PRODUCER_FENCED`, so two enforcers never both publish, whatever their clocks say.
//!
//! **Liveness is a heartbeat on the lease topic.** The active writes a [`LeaseRecord`] every
//! heartbeat interval through that fenced producer; standbys follow the topic and take over after
//! a session timeout without one (or at once when the active wrote that it stopped). The record
//! also carries how far alert delivery has got, so the alerts topic and the lease topic together
//! are the record of what was sent.
//!
//! Why not a consumer group's assignment of a one-partition topic, Kafka's usual election: Tansu
//! 0.6 (the local stack's broker) never moves a dead member's partition to the survivor (it keeps
//! the old generation's assignment until a member joins or leaves cleanly), and a group does not
//! fence a member that was paused. Tansu 0.6 has no `EndTxn` either, so the active's transaction is
//! begun once and never committed; Tansu's SQL storage engines hand such records to every reader.
//! On a broker that commits, a reader in `read_committed` would not see them until a commit: see
//! the README ("A standby enforcer").

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use rdkafka::Message;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::Producer as _;
use serde::{Deserialize, Serialize};
use tollgate_runtime::kafka::{Awaited, Outgoing, Producer};
use tracing::{info, warn};

/// What the active enforcer writes to the lease topic, keyed by the lease name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// The writer's instance id (`--instance-id`: host and listen address by default).
    pub instance: String,
    /// When it was written, by the writer's clock (informational: standbys time silence by their
    /// own clock, from when they read a record).
    pub at_us: i64,
    /// Per partition of the alerts topic, the offset below which every alert has been delivered
    /// (or given up) to its channels.
    pub delivered: BTreeMap<i32, i64>,
    /// The active stopped cleanly: a standby may take over at once.
    #[serde(default)]
    pub released: bool,
}

/// How the enforcers of one group choose their active one.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// Enforcers with the same group id and breaches topic are one group.
    pub group_id: String,
    /// One partition; created by the enforcer when missing.
    pub topic: String,
    /// This enforcer's id; `None`: host name and listen address.
    pub instance_id: Option<String>,
    /// A standby takes over after this long without a heartbeat from the active.
    pub session_timeout: Duration,
    pub heartbeat_every: Duration,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        Self {
            group_id: "tollgate-enforcer".into(),
            topic: tollgate_schemas::topics::ENFORCER_LEASE.into(),
            instance_id: None,
            // Kafka's classic consumer-group session timeout, and a heartbeat a fifth of it.
            session_timeout: Duration::from_secs(10),
            heartbeat_every: Duration::from_secs(2),
        }
    }
}

/// The lease's name, its record key and the `transactional.id` of the group's producer.
pub fn lease_name(group_id: &str, breaches_topic: &str) -> String {
    format!("{group_id}/{breaches_topic}")
}

/// This machine's name, for the default instance id.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}

/// Creates the lease topic (one partition) when it does not exist.
pub async fn ensure_topic(brokers: &str, extra: &[(String, String)], topic: &str) -> anyhow::Result<()> {
    let cc = tollgate_runtime::kafka::client_config(brokers, &[], None, extra);
    let admin: AdminClient<DefaultClientContext> = cc.create().context("creating a Kafka admin client")?;
    let new = NewTopic::new(topic, 1, TopicReplication::Fixed(1));
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = admin.create_topics(&[new], &opts).await.with_context(|| format!("creating {topic}"))?;
    for r in results {
        match r {
            Ok(_) => info!(%topic, "lease topic created"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, code)) => anyhow::bail!("creating the lease topic {t}: {code}"),
        }
    }
    Ok(())
}

/// The group's last lease record and how old it was when read (ms, by its timestamp and this
/// machine's clock; `None` when it has no timestamp).
pub type Last = Option<(LeaseRecord, Option<i64>)>;

/// How many records from the end of the lease topic are searched for the group's last one.
const LOOK_BACK: i64 = 10_000;

/// The group's last lease record (with its age when read) among the lease topic's last
/// [`LOOK_BACK`] records, and the topic's end. Blocks.
pub fn read_last(brokers: &str, extra: &[(String, String)], topic: &str, name: &str) -> anyhow::Result<(Last, i64)> {
    let settings = [("group.id", "tollgate-enforcer-lease"), ("isolation.level", "read_uncommitted")];
    let cc = tollgate_runtime::kafka::client_config(brokers, &settings, None, extra);
    let consumer: BaseConsumer = cc.create().context("creating a lease reader")?;
    let (low, high) = consumer
        .fetch_watermarks(topic, 0, Duration::from_secs(10))
        .with_context(|| format!("reading the end of {topic}"))?;
    let from = low.max(high - LOOK_BACK);
    let mut last: Last = None;
    // To the partition's end-of-file event: a takeover's abort marker may be the last offset.
    let ends = crate::topics::read_range(brokers, extra, topic, Some(&[(0, from)]), Duration::from_secs(60), |m| {
        if m.key() == Some(name.as_bytes())
            && let Some(mut r) = m.payload().and_then(|p| serde_json::from_slice::<LeaseRecord>(p).ok())
        {
            // Two writers' records (the delivery task's and the loop's heartbeats) may land out
            // of order: delivery only moves forward.
            if let Some((before, _)) = &last {
                merge_delivered(&mut r.delivered, &before.delivered);
            }
            let age = m.timestamp().to_millis().map(|w| crate::now_us() / 1000 - w);
            last = Some((r, age));
        }
    })?;
    let end = ends.first().map_or(high, |(_, at)| *at);
    Ok((last, end))
}

/// Keeps, per partition, the further of `into`'s and `other`'s delivered offsets.
pub fn merge_delivered(into: &mut BTreeMap<i32, i64>, other: &BTreeMap<i32, i64>) {
    for (p, at) in other {
        let mine = into.entry(*p).or_insert(*at);
        *mine = (*mine).max(*at);
    }
}

/// Whether an enforcer that starts may take over without waiting a session timeout: nobody has
/// held the lease, the last holder was this very instance (restarted), it released the lease, or
/// its last record was older than the session timeout when read.
pub fn free_at_start(last: Option<&(LeaseRecord, Option<i64>)>, instance: &str, timeout: Duration) -> bool {
    match last {
        None => true,
        Some((r, age_ms)) => {
            r.instance == instance || r.released || age_ms.is_none_or(|a| a > timeout.as_millis() as i64)
        }
    }
}

/// The active enforcer's hold on the lease: its fenced producer, and how far delivery has got.
pub struct Lease {
    pub producer: Producer<Awaited>,
    topic: String,
    name: String,
    instance: String,
    delivered: Mutex<BTreeMap<i32, i64>>,
}

/// The broker refused a write because another enforcer took over (or the producer failed for
/// good, which is handled the same way: stop publishing, stand by).
#[derive(Debug, thiserror::Error)]
#[error("fenced: another enforcer holds the lease ({0})")]
pub struct Fenced(pub String);

impl Lease {
    /// Takes the lease: a transactional producer whose `init_transactions` fences every earlier
    /// holder, one transaction begun, and a first record written (which fails if another
    /// enforcer took over meanwhile).
    pub async fn take(
        brokers: &str,
        extra: &[(String, String)],
        config: &LeaseConfig,
        name: String,
        instance: String,
        delivered: BTreeMap<i32, i64>,
    ) -> anyhow::Result<Arc<Lease>> {
        let settings = [
            ("acks", "all"),
            ("linger.ms", "1"),
            ("message.timeout.ms", "30000"),
            ("transactional.id", name.as_str()),
            // The transaction is never committed on a broker without EndTxn (module docs); Kafka
            // caps this at its transaction.max.timeout.ms (15 minutes by default).
            ("transaction.timeout.ms", "900000"),
        ];
        let cc = tollgate_runtime::kafka::client_config(brokers, &settings, None, extra);
        let producer = Producer::new(&cc, Awaited).context("creating the enforcer's transactional producer")?;
        let lease =
            Arc::new(Lease { producer, topic: config.topic.clone(), name, instance, delivered: Mutex::new(delivered) });
        let held = Arc::clone(&lease);
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            held.producer
                .init_transactions(Duration::from_secs(30))
                .context("init_transactions (fencing the last holder)")?;
            held.producer.begin_transaction().context("begin_transaction")?;
            Ok(())
        })
        .await
        .context("the lease thread failed")??;
        match lease.heartbeat(false).await {
            Ok(true) => Ok(lease),
            Ok(false) => anyhow::bail!("the first lease record was not written"),
            Err(e) => Err(anyhow::anyhow!("{e}")),
        }
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Where alert delivery stands.
    pub fn delivered(&self) -> BTreeMap<i32, i64> {
        self.delivered.lock().map(|d| d.clone()).unwrap_or_default()
    }

    /// Records that every alert of `partition` below `next` was delivered (kept in memory; the
    /// next heartbeat writes it).
    pub fn set_delivered(&self, partition: i32, next: i64) {
        if let Ok(mut d) = self.delivered.lock() {
            let at = d.entry(partition).or_insert(next);
            *at = (*at).max(next);
        }
    }

    /// Writes a lease record through the fenced producer and waits for the broker's answer:
    /// `Ok(true)` is proof that this enforcer still held the lease at that moment; `Ok(false)`, a
    /// write that failed for a passing reason (broker away, timeout: logged and counted), proves
    /// nothing; `Err` means another enforcer took the lease.
    pub async fn heartbeat(&self, released: bool) -> Result<bool, Fenced> {
        let record = LeaseRecord {
            instance: self.instance.clone(),
            at_us: crate::now_us(),
            delivered: self.delivered(),
            released,
        };
        let payload = serde_json::to_vec(&record).map_err(|e| Fenced(e.to_string()))?;
        let out =
            Outgoing { topic: &self.topic, key: Some(self.name.as_bytes()), payload: Some(&payload), headers: None };
        match self.producer.send_awaited(out, Duration::from_secs(10)).await {
            Ok(_) => Ok(true),
            Err(e) => match self.why_failed(&e) {
                Some(fenced) => Err(fenced),
                None => {
                    crate::metrics::publish_error("lease");
                    warn!(error = %e, "lease record not written; trying again");
                    Ok(false)
                }
            },
        }
    }

    /// `Some` when a failed send means this producer will never write again (fenced, or a fatal
    /// error); `None` for a failure worth retrying.
    pub fn why_failed(&self, e: &KafkaError) -> Option<Fenced> {
        if let Some((code, reason)) = self.producer.client().fatal_error() {
            return Some(Fenced(format!("{code:?}: {reason}")));
        }
        match e.rdkafka_error_code() {
            Some(
                RDKafkaErrorCode::ProducerFenced | RDKafkaErrorCode::InvalidProducerEpoch | RDKafkaErrorCode::Fenced,
            ) => Some(Fenced(e.to_string())),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn record(instance: &str, released: bool) -> LeaseRecord {
        LeaseRecord { instance: instance.into(), at_us: 0, delivered: BTreeMap::from([(0, 7)]), released }
    }

    #[test]
    fn a_starting_enforcer_waits_only_for_a_live_other_holder() {
        let t = Duration::from_secs(10);
        assert!(free_at_start(None, "a", t), "nobody ever held it");
        assert!(free_at_start(Some(&(record("a", false), Some(0))), "a", t), "this instance, restarted");
        assert!(free_at_start(Some(&(record("b", true), Some(0))), "a", t), "released");
        assert!(free_at_start(Some(&(record("b", false), Some(10_001))), "a", t), "silent too long");
        assert!(!free_at_start(Some(&(record("b", false), Some(9_000))), "a", t), "b heartbeats");
    }

    #[test]
    fn a_lease_record_reads_back_and_older_ones_default_released() {
        let r = record("host/127.0.0.1:9102", false);
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<LeaseRecord>(&json).unwrap(), r);
        let old: LeaseRecord = serde_json::from_str(r#"{"instance":"x","at_us":1,"delivered":{}}"#).unwrap();
        assert!(!old.released);
    }
}
