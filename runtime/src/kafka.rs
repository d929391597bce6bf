//! Kafka client pieces every service shares: how long each kind of consumer lets the broker hold
//! a fetch when nothing is new, and a producer that does not spin while idle.
//!
//! **Fetch waits.** Apache Kafka answers a fetch as soon as a record arrives and otherwise holds
//! it for `fetch.wait.max.ms`, so on Kafka a long wait costs no latency. Not every Kafka-API
//! broker does that: Tansu 0.6 (the local stack's broker) emulates the long poll by looking at its
//! storage, sleeping, and looking again until the wait is over, and it answers only after the sleep
//! that follows the look that found records. A record is therefore handed over up to one whole
//! wait after it arrived, and an idle consumer costs the broker a few storage rounds per wait
//! (about 1 ms of its CPU each for one partition, 2 ms for four). Waits of 10 ms kept Tansu at
//! 38–62% of a core with no traffic at all (issue 11); waits long enough to be quiet would make
//! every decision late.
//!
//! So the two consumers on the decision path follow their traffic: a short wait while it flows
//! (the enforcer's usage reader while events arrive, an ingress's decision follower while the
//! ingress serves requests), a long one after [`QUIET_AFTER`] without, and back at the first event
//! or request (`Follow::active_wait_ms`, `Follow::quiet_wait_ms`; the consumer is re-created at
//! its positions, which costs a few milliseconds). The meter (200 ms) and the history readers
//! (5 s) keep one wait. At rest the whole stack stays under 5% of a core
//! (`tests/bench/idle`); under traffic a decision reaches every ingress within about two short
//! waits.
//!
//! Every consumer's settings still take the operator's `--kafka-option key=value` last, so a
//! deployment on Apache Kafka may shorten or lengthen any of them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, ProducerContext};
use rdkafka::{ClientConfig, ClientContext, Message as _};
use tokio::sync::oneshot;

/// What a consumer reads, and so how soon it must see a new record.
///
/// Tansu 0.6 looks at its storage, then sleeps half of what is left of the wait while that is
/// 250 ms or more, else all of it, and answers after the sleep that follows a look that found
/// records: a wait `W` below 250 ms costs 2 looks per `W`, from 250 ms to 500 ms 3, to 1 s 4, to 2 s
/// 5, and a record is handed over within `W`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Follow {
    /// The breaches topic, read by every ingress: a decision must reach the request path fast.
    Decisions,
    /// The usage stream, read by the enforcer: a breach must be decided fast.
    Usage,
    /// The usage stream, read by the meter: rows in ClickHouse within a few seconds.
    Metering,
    /// Decision and alert history (the meter), replays at start: no one waits on them.
    History,
    /// Decisions and alerts shown live (the console): a person watching waits about a second.
    Live,
}

/// How long a following consumer (`Decisions`, `Usage`) waits without traffic before it switches
/// to its quiet wait.
pub const QUIET_AFTER: Duration = Duration::from_secs(10);

impl Follow {
    /// `fetch.wait.max.ms` while records (for `Decisions`: requests) keep coming.
    pub const fn active_wait_ms(self) -> u32 {
        match self {
            Follow::Decisions | Follow::Usage => 50,
            // The meter is never re-created (in a consumer group that would be a rebalance), so it
            // keeps one wait, and on Tansu every fetch lasts at least half of it even when records
            // are there (at most 5 MB each): under 250 ms the wait is two looks per wait at rest
            // and a fetch every 200 ms under load, where 1,990 ms held the meter to about one
            // 5 MB fetch a second.
            Follow::Metering => 200,
            Follow::History => 5_000,
            Follow::Live => 990,
        }
    }

    /// `fetch.wait.max.ms` after [`QUIET_AFTER`] without traffic: what the first record after a
    /// quiet spell may wait (an ingress with no request to serve has no decision to apply).
    pub const fn quiet_wait_ms(self) -> u32 {
        match self {
            Follow::Decisions => 1_990,
            Follow::Usage => 990,
            Follow::Metering => 200,
            Follow::History => 5_000,
            Follow::Live => 990,
        }
    }
}

/// Records whether `follow`'s consumer has its quiet fetch wait now
/// (`tollgate_kafka_consumer_quiet{consumer}`: 1 quiet, 0 active).
pub fn quiet_gauge(follow: Follow, quiet: bool) {
    metrics::describe_gauge!(
        "tollgate_kafka_consumer_quiet",
        "1 while a decision-path consumer has its long fetch wait (no traffic for 10 s), 0 while it has its short one"
    );
    let consumer = match follow {
        Follow::Decisions => "decisions",
        Follow::Usage => "usage",
        Follow::Metering => "metering",
        Follow::History => "history",
        Follow::Live => "live",
    };
    metrics::gauge!("tollgate_kafka_consumer_quiet", "consumer" => consumer).set(if quiet { 1.0 } else { 0.0 });
}

/// Every Tollgate Kafka client's configuration, built one way: the brokers, the client's own
/// `settings`, a consumer's fetch waits (`fetch`: what it follows, and whether quietly), then the
/// operator's `--kafka-option`s, which win over everything before them.
pub fn client_config(
    brokers: &str,
    settings: &[(&str, &str)],
    fetch: Option<(Follow, bool)>,
    operator: &[(String, String)],
) -> ClientConfig {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", brokers);
    for (k, v) in settings {
        cc.set(*k, *v);
    }
    if let Some((f, quiet)) = fetch {
        follow(&mut cc, f, quiet);
    }
    for (k, v) in operator {
        cc.set(k, v);
    }
    cc
}

/// Sets the fetch waits of `follow` on `cc`, quiet or active (call it before applying the
/// operator's own settings, which win).
pub fn follow(cc: &mut ClientConfig, follow: Follow, quiet: bool) -> &mut ClientConfig {
    let wait = if quiet { follow.quiet_wait_ms() } else { follow.active_wait_ms() };
    cc.set("fetch.wait.max.ms", wait.to_string())
        // Answer as soon as there is anything at all.
        .set("fetch.min.bytes", "1")
}

/// How long one call of the polling thread waits for delivery reports. rdkafka's own
/// `ThreadedProducer` (and so `FutureProducer`) polls in 100 ms calls, and each call spins through
/// its last partial millisecond (the remaining time rounds down to a 0 ms, non-blocking poll until
/// the deadline passes): about 1% of a core per idle producer, a fifth of the whole stack's budget
/// at rest. Calls of a second spin that last millisecond ten times less often; a report is still
/// served the moment it arrives, and a dropped producer's thread ends within one call.
const POLL_WAIT: Duration = Duration::from_secs(1);

/// A Kafka producer whose delivery reports are served by a thread of its own (see
/// [`POLL_WAIT`]). Derefs to the `BaseProducer` for `send`, `purge` and the client.
pub struct Producer<C: ProducerContext + 'static> {
    inner: Arc<BaseProducer<C>>,
    stop: Arc<AtomicBool>,
}

impl<C: ProducerContext + 'static> Producer<C> {
    /// Creates the producer from `cc` with `context` and starts its polling thread.
    pub fn new(cc: &ClientConfig, context: C) -> KafkaResult<Self> {
        let inner: Arc<BaseProducer<C>> = Arc::new(cc.create_with_context(context)?);
        let stop = Arc::new(AtomicBool::new(false));
        let (producer, stopped) = (Arc::clone(&inner), Arc::clone(&stop));
        std::thread::Builder::new()
            .name("kafka-deliveries".into())
            .spawn(move || {
                while !stopped.load(Ordering::Relaxed) {
                    producer.poll(POLL_WAIT);
                }
                // The last handle to the producer may be this one: dropping it here purges and
                // reports what is still queued, off the caller's thread.
            })
            .map_err(|e| KafkaError::ClientCreation(format!("starting the delivery thread: {e}")))?;
        Ok(Self { inner, stop })
    }
}

impl<C: ProducerContext + 'static> std::ops::Deref for Producer<C> {
    type Target = BaseProducer<C>;
    fn deref(&self) -> &BaseProducer<C> {
        &self.inner
    }
}

impl<C: ProducerContext + 'static> Drop for Producer<C> {
    /// Stops the polling thread after its current call, without waiting for it (an async caller
    /// must not block for up to a second); the thread drops the producer last.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The context of a producer whose every send is awaited: the delivery report completes the
/// sender's future.
pub struct Awaited;

/// Where a record landed, or why it did not.
pub type Delivered = KafkaResult<(i32, i64)>;

impl ClientContext for Awaited {}

impl ProducerContext for Awaited {
    type DeliveryOpaque = Box<oneshot::Sender<Delivered>>;

    fn delivery(&self, result: &DeliveryResult<'_>, tx: Self::DeliveryOpaque) {
        let outcome = match result {
            Ok(m) => Ok((m.partition(), m.offset())),
            Err((e, _)) => Err(e.clone()),
        };
        // A sender that stopped waiting no longer cares.
        let _ = tx.send(outcome);
    }
}

/// One record for [`Producer::send_awaited`].
pub struct Outgoing<'a> {
    pub topic: &'a str,
    pub key: Option<&'a [u8]>,
    pub payload: Option<&'a [u8]>,
    pub headers: Option<OwnedHeaders>,
}

impl Producer<Awaited> {
    /// Queues `record` (retrying while librdkafka's queue is full, up to `queue_timeout`) and
    /// waits for its delivery report: its partition and offset, or the error.
    pub async fn send_awaited(&self, record: Outgoing<'_>, queue_timeout: Duration) -> Delivered {
        let (tx, rx) = oneshot::channel();
        let mut base = BaseRecord::with_opaque_to(record.topic, Box::new(tx));
        if let Some(k) = record.key {
            base = base.key(k);
        }
        if let Some(p) = record.payload {
            base = base.payload(p);
        }
        if let Some(h) = record.headers {
            base = base.headers(h);
        }
        let started = Instant::now();
        loop {
            match self.send(base) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                    if started.elapsed() < queue_timeout =>
                {
                    base = back;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err((e, _)) => return Err(e),
            }
        }
        // The report always comes: delivered, failed, or purged when the producer is dropped.
        rx.await.unwrap_or(Err(KafkaError::Canceled))
    }
}

/// Copies `m` to the dead-letter `topic` with why (`tollgate-error`), who set it aside
/// (`tollgate-rejected-by`) and where it came from (`tollgate-source-topic`, `-partition`,
/// `-offset`), so a record that cannot be counted never blocks its partition and is never lost.
pub async fn dead_letter(
    producer: &Producer<Awaited>,
    topic: &str,
    m: &BorrowedMessage<'_>,
    error: &str,
    rejected_by: &str,
) -> Delivered {
    let partition = m.partition().to_string();
    let offset = m.offset().to_string();
    let headers = OwnedHeaders::new()
        .insert(Header { key: "tollgate-error", value: Some(error) })
        .insert(Header { key: "tollgate-rejected-by", value: Some(rejected_by) })
        .insert(Header { key: "tollgate-source-topic", value: Some(m.topic()) })
        .insert(Header { key: "tollgate-source-partition", value: Some(&partition) })
        .insert(Header { key: "tollgate-source-offset", value: Some(&offset) });
    let record =
        Outgoing { topic, key: m.key(), payload: Some(m.payload().unwrap_or_default()), headers: Some(headers) };
    producer.send_awaited(record, Duration::from_secs(30)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_config_takes_the_operators_options_last() {
        let operator = [("fetch.wait.max.ms".to_owned(), "7".to_owned()), ("acks".to_owned(), "1".to_owned())];
        let cc =
            client_config("b:9092", &[("acks", "all"), ("linger.ms", "10")], Some((Follow::Usage, false)), &operator);
        assert_eq!(cc.get("bootstrap.servers"), Some("b:9092"));
        assert_eq!(cc.get("linger.ms"), Some("10"));
        assert_eq!(cc.get("acks"), Some("1"), "the operator's option wins over the client's own");
        assert_eq!(cc.get("fetch.wait.max.ms"), Some("7"), "and over the fetch wait");
        let plain = client_config("b:9092", &[], None, &[]);
        assert_eq!(plain.get("fetch.wait.max.ms"), None);
    }

    #[test]
    fn the_decision_path_waits_less_than_its_budget_while_traffic_flows() {
        // Two waits in a row (the enforcer's usage read, the ingress's decision read) must fit
        // the 250 ms usage-to-decision budget with room for evaluation and produce.
        assert!(Follow::Usage.active_wait_ms() + Follow::Decisions.active_wait_ms() <= 150);
        assert!(Follow::Usage.quiet_wait_ms() > Follow::Usage.active_wait_ms());
        let mut cc = ClientConfig::new();
        follow(&mut cc, Follow::Decisions, true);
        assert_eq!(cc.get("fetch.wait.max.ms"), Some("1990"));
        follow(&mut cc, Follow::Decisions, false);
        assert_eq!(cc.get("fetch.wait.max.ms"), Some("50"));
    }
}
