//! Breaches and alerts as they happen: a consumer of `tollgate.breaches.v1` and
//! `tollgate.alerts.v1` that never joins a group or commits, a bounded ring of the latest ones,
//! and a broadcast to the pages following `/live/events` (server-sent events).
//!
//! A decision's tombstone is not shown: the enforcer writes one to forget a scope whose window
//! has drained after its `cleared` decision, which the page has shown already.
//!
//! It starts each partition a little back ([`Config::live_backlog`] records), so a page opened
//! just after a breach still shows it; a page that falls behind the broadcast is told how many it
//! missed. The ring and the number of following pages are bounded: what a caller chooses (a
//! scope) can only fill them up to their size.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::Serialize;
use serde_json::Value;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tollgate_schemas::avro::AvroCodec;
use tollgate_schemas::decision::{Alert, BreachDecision, Measure};
use tracing::{info, warn};

use crate::Config;

/// One record shown live.
#[derive(Debug, Clone, Serialize)]
pub struct LiveEvent {
    /// `breach` (a decision of the breaches topic, whatever its state) or `alert`.
    pub kind: &'static str,
    /// Unique per record: topic, partition and offset.
    pub id: String,
    /// The record's key (`rule_id/scope` for decisions).
    pub key: String,
    /// When it was decided or raised (microseconds; the record's time for a tombstone).
    pub at_us: i64,
    /// The same instant in UTC, as the reports print times.
    pub at: String,
    pub rule_id: String,
    pub scope: String,
    /// A decision's state or an alert's severity.
    pub state: String,
    /// A decision's action or an alert's summary.
    pub action: String,
    /// Observed against the limit, in the measure's units (money as exact dollars).
    pub observed: String,
    pub limit: String,
    pub measure: String,
    /// The whole record as JSON, for whoever wants more.
    pub record: Value,
}

/// The ring of recent events and the broadcast to live pages.
pub struct Hub {
    tx: broadcast::Sender<Arc<LiveEvent>>,
    /// Wakes the paused consumer when a page starts following.
    wake: tokio::sync::Notify,
    recent: Mutex<VecDeque<Arc<LiveEvent>>>,
    capacity: usize,
}

impl Hub {
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        let (tx, _) = broadcast::channel(capacity.max(16));
        Hub { tx, wake: tokio::sync::Notify::new(), recent: Mutex::new(VecDeque::with_capacity(capacity)), capacity }
    }

    pub fn publish(&self, ev: LiveEvent) {
        let ev = Arc::new(ev);
        if let Ok(mut recent) = self.recent.lock() {
            while recent.len() >= self.capacity {
                recent.pop_front();
            }
            recent.push_back(Arc::clone(&ev));
        }
        metrics::counter!("tollgate_console_live_events_total", "kind" => ev.kind).increment(1);
        // No page following is not an error: the ring keeps it for the next one.
        let _ = self.tx.send(ev);
    }

    /// A receiver for what comes next and the ring as it is now (oldest first); subscribing first
    /// means nothing falls between the two (a duplicate is dropped by the page, by id).
    pub fn follow(&self) -> (broadcast::Receiver<Arc<LiveEvent>>, Vec<Arc<LiveEvent>>) {
        let rx = self.tx.subscribe();
        self.wake.notify_one();
        let recent = self.recent.lock().map(|r| r.iter().cloned().collect()).unwrap_or_default();
        (rx, recent)
    }

    /// Pages following now.
    pub fn followers(&self) -> usize {
        self.tx.receiver_count()
    }
}

/// A limit or observed figure in its measure's units: money as exact dollars.
pub fn amount(measure: Measure, value: i64) -> String {
    match measure {
        Measure::CostNanos => format!("${}", tollgate_meter::report::format_usd(value)),
        Measure::Tokens => format!("{value} tokens"),
        Measure::Requests => format!("{value} requests"),
    }
}

fn breach_event(id: String, key: String, d: &BreachDecision) -> LiveEvent {
    LiveEvent {
        kind: "breach",
        id,
        key,
        at_us: d.decided_at_us,
        at: fmt_us(d.decided_at_us),
        rule_id: d.rule_id.clone(),
        scope: d.scope.clone(),
        state: d.state.as_str().into(),
        action: d.action.clone(),
        observed: amount(d.measure, d.observed),
        limit: amount(d.measure, d.limit),
        measure: d.measure.as_str().into(),
        record: serde_json::to_value(d).unwrap_or(Value::Null),
    }
}

fn alert_event(id: String, key: String, a: &Alert) -> LiveEvent {
    LiveEvent {
        kind: "alert",
        id,
        key,
        at_us: a.raised_at_us,
        at: fmt_us(a.raised_at_us),
        rule_id: a.rule_id.clone(),
        scope: a.scope.clone(),
        state: a.severity.as_str().into(),
        action: a.summary.clone(),
        observed: amount(a.measure, a.observed),
        limit: amount(a.measure, a.limit),
        measure: a.measure.as_str().into(),
        record: serde_json::to_value(a).unwrap_or(Value::Null),
    }
}

/// Microseconds since the epoch as the reports print times (UTC, to the second).
pub fn fmt_us(us: i64) -> String {
    tollgate_meter::report::fmt_time(us.div_euclid(1_000_000))
}

/// Follows the two topics into `hub` until `shutdown`; a topic not there yet is looked for again
/// every few seconds.
pub async fn follow(config: Arc<Config>, hub: Arc<Hub>, shutdown: CancellationToken) {
    let settings = [
        ("group.id", "tollgate-console"),
        ("client.id", "tollgate-console"),
        ("enable.auto.commit", "false"),
        ("enable.auto.offset.store", "false"),
        ("auto.offset.reset", "latest"),
        // The enforcer publishes inside a transaction it never commits on a broker without
        // EndTxn (Tansu 0.6; ingress `decisions::follower`).
        ("isolation.level", "read_uncommitted"),
    ];
    let cc = tollgate_runtime::kafka::client_config(
        &config.kafka_brokers,
        &settings,
        Some((tollgate_runtime::kafka::Follow::Live, false)),
        &config.kafka_extra,
    );
    let consumer: Arc<StreamConsumer> = match cc.create() {
        Ok(c) => Arc::new(c),
        Err(e) => {
            warn!(error = %e, "cannot create the live consumer; the breaches page shows history only");
            return;
        }
    };
    let (breach_codec, alert_codec) = match (BreachDecision::codec(), Alert::codec()) {
        (Ok(b), Ok(a)) => (b, a),
        (Err(e), _) | (_, Err(e)) => {
            warn!(error = %e, "decision codecs");
            return;
        }
    };
    let topics = [config.breaches_topic.clone(), config.alerts_topic.clone()];
    let backlog = i64::try_from(config.live_backlog).unwrap_or(200);
    // Assign each topic's partitions once they exist.
    let mut assigned = TopicPartitionList::new();
    let mut missing: Vec<String> = topics.to_vec();
    while !missing.is_empty() {
        let c = Arc::clone(&consumer);
        let wanted = missing.clone();
        let found = tokio::task::spawn_blocking(move || {
            let mut found = Vec::new();
            for t in &wanted {
                if let Ok(md) = c.fetch_metadata(Some(t), Duration::from_secs(5)) {
                    let parts = tollgate_runtime::partitions_in(&md, t);
                    if !parts.is_empty() {
                        found.push((t.clone(), parts));
                    }
                }
            }
            found
        })
        .await
        .unwrap_or_default();
        // Assigning again restarts every listed partition at its tail, so only when a topic
        // appeared, and only with the new one's partitions.
        let mut new = TopicPartitionList::new();
        for (topic, parts) in found {
            for p in parts {
                let _ = new.add_partition_offset(&topic, p, Offset::OffsetTail(backlog));
                let _ = assigned.add_partition_offset(&topic, p, Offset::OffsetTail(backlog));
            }
            missing.retain(|t| *t != topic);
            info!(topic, "following live");
        }
        if new.count() > 0 {
            if let Err(e) = consumer.incremental_assign(&new) {
                warn!(error = %e, "live consumer assignment");
            }
        }
        if missing.is_empty() {
            break;
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
    // With no page following, the partitions are paused: the consumer sends the broker no fetch
    // at all (Tansu answers each by looking at its storage, a cost every idle second), and keeps
    // its positions, so a page that opens later gets what came meanwhile once they resume.
    let mut paused = false;
    loop {
        if hub.followers() == 0 {
            if !paused {
                match consumer.assignment().and_then(|a| consumer.pause(&a)) {
                    Ok(()) => paused = true,
                    Err(e) => warn!(error = %e, "pausing the live consumer"),
                }
                tollgate_runtime::kafka::quiet_gauge(tollgate_runtime::kafka::Follow::Live, paused);
            }
            if paused {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = hub.wake.notified() => {}
                }
                continue;
            }
        } else if paused {
            match consumer.assignment().and_then(|a| consumer.resume(&a)) {
                Ok(()) => paused = false,
                Err(e) => warn!(error = %e, "resuming the live consumer"),
            }
            tollgate_runtime::kafka::quiet_gauge(tollgate_runtime::kafka::Follow::Live, paused);
        }
        // Woken now and then to see whether the last page has gone.
        let msg = tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(5)) => continue,
            m = consumer.recv() => m,
        };
        let msg = match msg {
            Ok(m) => m,
            Err(e) => {
                warn!(error = %e, "live consumer");
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                continue;
            }
        };
        let id = format!("{}/{}/{}", msg.topic(), msg.partition(), msg.offset());
        let key = msg.key().and_then(|k| std::str::from_utf8(k).ok()).unwrap_or_default().to_owned();
        if msg.payload().is_none() {
            // A tombstone (see the module's comment).
            continue;
        }
        let ev = if msg.topic() == config.breaches_topic {
            decode_breach(&breach_codec, id, key, msg.payload())
        } else {
            msg.payload().and_then(|p| alert_codec.decode::<Alert>(p).ok()).map(|a| alert_event(id, key, &a))
        };
        match ev {
            Some(ev) => hub.publish(ev),
            None => metrics::counter!("tollgate_console_live_undecodable_total").increment(1),
        }
    }
}

fn decode_breach(codec: &AvroCodec, id: String, key: String, payload: Option<&[u8]>) -> Option<LiveEvent> {
    codec.decode::<BreachDecision>(payload?).ok().map(|d| breach_event(id, key, &d))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use tollgate_schemas::decision::DecisionState;

    #[test]
    fn the_ring_keeps_the_latest_and_a_follower_gets_what_comes_next() {
        let hub = Hub::new(2);
        let ev = |n: i64| {
            let d = BreachDecision::example("r", format!("s{n}"), DecisionState::Breached, n);
            breach_event(format!("t/0/{n}"), format!("r/s{n}"), &d)
        };
        hub.publish(ev(1));
        hub.publish(ev(2));
        hub.publish(ev(3));
        let (mut rx, recent) = hub.follow();
        assert_eq!(recent.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(), ["t/0/2", "t/0/3"]);
        hub.publish(ev(4));
        assert_eq!(rx.try_recv().unwrap().id, "t/0/4");
    }

    #[test]
    fn money_is_exact_and_a_decision_reads_back() {
        assert_eq!(amount(Measure::CostNanos, 4_000_000_000_000), "$4000.000000000");
        assert_eq!(amount(Measure::Tokens, 200_000), "200000 tokens");
        let codec = BreachDecision::codec().unwrap();
        let d = BreachDecision::example("per-session", "session:a/b", DecisionState::Breached, 3);
        let ev = decode_breach(&codec, "t/0/9".into(), d.key(), Some(&codec.encode(&d).unwrap())).unwrap();
        assert_eq!(
            (ev.kind, ev.rule_id.as_str(), ev.scope.as_str(), ev.state.as_str()),
            ("breach", "per-session", "session:a/b", "breached")
        );
        assert!(decode_breach(&codec, "t/0/10".into(), d.key(), None).is_none());
        assert!(decode_breach(&codec, "t/0/11".into(), d.key(), Some(b"garbage")).is_none());
    }
}
