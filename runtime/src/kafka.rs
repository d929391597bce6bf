//! Kafka client pieces every service shares: how long each kind of consumer lets the broker hold
//! a fetch when nothing is new, and a producer that does not spin while idle.
//!
//! **Fetch waits.** Apache Kafka answers a fetch as soon as a record arrives and otherwise holds
//! it for `fetch.wait.max.ms`, so on Kafka a long wait costs no latency. Not every Kafka-API
//! broker does that: Tansu 0.6 (the local stack's broker) emulates the long poll by re-running its
//! storage queries at the start and the end of the wait (and at halving intervals when the wait is
//! 250 ms or more), and sees a new record only at its next look: an idle consumer costs it two to
//! five storage rounds per wait (about 1 ms of broker CPU each for one partition, 2 ms for four),
//! and a record on an idle topic waits up to a round's gap. Waits of 10 ms kept Tansu at 38–62% of
//! a core with no traffic at all (issue 11). The waits below hold the whole stack at rest under 5%
//! of a core (`tests/bench/idle`). A decision waits at most 200 ms before an ingress sees it;
//! usage that flows is read at once (each fetch finds records), and only the first event after an
//! idle spell waits up to 245 ms for the enforcer and about a second for the meter.
//!
//! Every consumer's settings still take the operator's `--kafka-set key=value` last, so a
//! deployment on Apache Kafka may shorten or lengthen any of them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, ProducerContext};
use rdkafka::{ClientConfig, ClientContext, Message as _};
use tokio::sync::oneshot;

/// What a consumer reads, and so how soon it must see a new record.
///
/// On a broker that polls its storage the way Tansu 0.6 does (look, then sleep half of what is
/// left while that is 250 ms or more, else all of it, until the wait is over), a wait `W` costs
/// 2 looks for `W` < 250 ms, 3 for 250 ≤ `W` < 500 (gaps of `W`/2), 4 for 500 ≤ `W` < 1000 and
/// 5 for 1000 ≤ `W` < 2000, and a record is seen at the next look. So 400 ms sees a decision
/// within 200 ms for 7.5 looks a second where 200 ms takes 10, and 490 ms sees usage within
/// 245 ms for 6.1 looks a second where 500 ms takes 8.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Follow {
    /// The breaches topic, read by every ingress: a decision must reach the request path fast.
    Decisions,
    /// The usage stream, read by the enforcer: a breach must be decided fast.
    Usage,
    /// The usage stream, read by the meter: rows in ClickHouse within about a second.
    Metering,
    /// Decision and alert history (the meter), replays at start: no one waits on them.
    History,
}

impl Follow {
    /// `fetch.wait.max.ms` for this consumer.
    pub const fn fetch_wait_ms(self) -> u32 {
        match self {
            Follow::Decisions => 400,
            Follow::Usage => 490,
            Follow::Metering => 1_990,
            Follow::History => 5_000,
        }
    }
}

/// Sets the fetch waits of `follow` on `cc` (call it before applying the operator's own settings).
pub fn follow(cc: &mut ClientConfig, follow: Follow) -> &mut ClientConfig {
    cc.set("fetch.wait.max.ms", follow.fetch_wait_ms().to_string())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions_wait_less_than_their_budget() {
        // On a broker that polls its storage, a decision waits up to one wait before an ingress
        // sees it: that must fit the 250 ms usage-to-decision budget with room for the rest.
        // Three looks per wait below 500 ms: the gap is half the wait.
        assert!(Follow::Decisions.fetch_wait_ms() < 500 && Follow::Decisions.fetch_wait_ms() / 2 <= 200);
        let mut cc = ClientConfig::new();
        follow(&mut cc, Follow::History);
        assert_eq!(cc.get("fetch.wait.max.ms"), Some("5000"));
    }
}
