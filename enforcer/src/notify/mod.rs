//! Delivers alerts to the channels their `notify` names: Slack, PagerDuty and JSON webhooks.
//!
//! The caller (who publishes the alert to `tollgate.alerts.v1` and keeps each threshold to once
//! per window per scope) hands an [`Alert`] to [`Notifier::notify`], which returns at once:
//! every channel of the alert gets its own background delivery, so a slow or dead receiver
//! never holds up the caller or the other channels.
//!
//! - `slack:…` gets a Slack incoming-webhook message: `text` (the notification fallback) and
//!   `blocks` (header, summary, the numbers, the window).
//! - `pagerduty:…` gets a PagerDuty Events API v2 `trigger` whose `dedup_key` is the alert id,
//!   so a retried or repeated delivery lands on the same PagerDuty alert instead of paging
//!   twice; the routing key comes from the channel's `routing_key_env` variable.
//! - `webhook:…` gets the alert itself as JSON, with `Idempotency-Key` and
//!   `X-Tollgate-Alert-Id` headers carrying the alert id.
//!
//! A delivery is retried with capped exponential backoff and jitter on connect errors,
//! timeouts, 408, 429 and 5xx (a `Retry-After` answer is waited out exactly), and given up at
//! once on any other answer that is not 2xx; it is also given up after
//! [`NotifyConfig::max_attempts`] attempts or [`NotifyConfig::max_elapsed`], logged at error
//! level with the alert id. URLs are secrets (a Slack webhook URL is its own credential), so
//! logs name the channel, never the URL.
//!
//! The pieces: `channel` resolves the policy's channels (kind, URL, routing key, or why one
//! cannot be used); `delivery` runs one alert to one channel in the background (the bounded
//! pending count, retries and backoff, the HTTP attempt); `payload` builds the body each
//! channel kind receives. This file holds the public [`Notifier`] API, its configuration and
//! its counts.

mod channel;
mod delivery;
mod payload;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use metrics::{Unit, counter, describe_counter, describe_gauge, describe_histogram, histogram};
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tollgate_schemas::decision::Alert;
use tollgate_schemas::policy::AlertChannel;
use tracing::{error, warn};

use channel::{Channels, kind_label, kind_of_name, resolve_all};
use delivery::{Pending, deliver};
pub use payload::{format_amount, pagerduty_payload, slack_payload, webhook_payload};

/// After [`Notifier::shutdown`] abandons deliveries, how long it waits for them to count
/// themselves.
const ABANDON_GRACE: Duration = Duration::from_secs(1);

/// How deliveries are made and retried.
#[derive(Debug, Clone)]
pub struct NotifyConfig {
    /// Limit on establishing a connection to a receiver.
    pub connect_timeout: Duration,
    /// Limit on one whole attempt, from sending to the end of the answer.
    pub request_timeout: Duration,
    /// Attempts per delivery, the first included; at least 1.
    pub max_attempts: u32,
    /// A delivery is given up when the next retry would start later than this after the alert
    /// was handed over.
    pub max_elapsed: Duration,
    /// Backoff before the first retry; doubles per attempt up to `max_backoff`, and each wait
    /// is drawn between half and all of that ("equal jitter").
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Deliveries accepted but not finished (waiting, in flight or backing off); beyond this
    /// new ones are dropped and counted.
    pub max_pending: usize,
    /// Requests in flight at once, over all channels.
    pub max_in_flight: usize,
}

impl Default for NotifyConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            max_attempts: 8,
            max_elapsed: Duration::from_secs(10 * 60),
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            max_pending: 10_000,
            max_in_flight: 16,
        }
    }
}

/// The notifier could not be built.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// The TLS backend or system configuration refused to build an HTTP client; retrying does
    /// not help.
    #[error("cannot build the alert webhook HTTP client: {0}")]
    Client(#[source] reqwest::Error),
}

/// What happened to deliveries since the notifier was built; the same numbers as the
/// `tollgate_enforcer_alert_deliveries_total` counter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeliveryStats {
    /// Accepted by the receiver (2xx).
    pub delivered: u64,
    /// Attempts that failed and were retried.
    pub retried: u64,
    /// Given up: refused, retries exhausted, or the channel is unknown or not configured.
    pub failed: u64,
    /// Never finished for want of room: queue full, no runtime, or shutting down.
    pub dropped: u64,
}

/// Declares the delivery metrics; [`Notifier::new`] calls it.
pub fn describe() {
    describe_counter!(
        "tollgate_enforcer_alert_deliveries_total",
        "Alert deliveries to notify channels, by channel kind and outcome (delivered, retried, failed, dropped)"
    );
    describe_histogram!(
        "tollgate_enforcer_alert_delivery_seconds",
        Unit::Seconds,
        "Time from handing an alert over to its final outcome (delivered or failed), retries included"
    );
    describe_histogram!(
        "tollgate_enforcer_alert_attempt_seconds",
        Unit::Seconds,
        "Duration of one HTTP attempt to deliver an alert, by channel kind"
    );
    describe_gauge!("tollgate_enforcer_alert_deliveries_pending", "Alert deliveries accepted and not yet finished");
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Delivered,
    Retried,
    Failed,
    Dropped,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Delivered => "delivered",
            Outcome::Retried => "retried",
            Outcome::Failed => "failed",
            Outcome::Dropped => "dropped",
        }
    }

    fn index(self) -> usize {
        match self {
            Outcome::Delivered => 0,
            Outcome::Retried => 1,
            Outcome::Failed => 2,
            Outcome::Dropped => 3,
        }
    }
}

/// Delivers alerts to their channels in the background. Cheap to clone; clones share the
/// queue, the channels and the counts.
#[derive(Clone)]
pub struct Notifier {
    inner: Arc<Inner>,
}

impl fmt::Debug for Notifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Notifier").field("pending", &self.pending()).field("stats", &self.stats()).finish()
    }
}

struct Inner {
    config: NotifyConfig,
    http: reqwest::Client,
    channels: RwLock<Arc<Channels>>,
    /// Deliveries accepted and not finished; `flush` waits for it to reach zero.
    pending: watch::Sender<usize>,
    permits: Semaphore,
    closing: AtomicBool,
    /// Cancelled when `shutdown` abandons what is left.
    abandon: CancellationToken,
    counts: [AtomicU64; 4],
}

impl Notifier {
    /// A notifier over the policy's `alert_channels`. URLs and routing keys given through
    /// environment variables are read now (and again by [`Notifier::set_channels`]).
    pub fn new(channels: &BTreeMap<String, AlertChannel>, config: NotifyConfig) -> Result<Self, NotifyError> {
        describe();
        let http = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .timeout(config.request_timeout)
            // A webhook that redirects is misconfigured, and following it would turn the POST
            // into a GET: the 3xx is reported instead.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("tollgate-enforcer/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(NotifyError::Client)?;
        let permits = Semaphore::new(config.max_in_flight.clamp(1, Semaphore::MAX_PERMITS));
        let inner = Inner {
            config,
            http,
            channels: RwLock::new(Arc::new(resolve_all(channels))),
            pending: watch::Sender::new(0),
            permits,
            closing: AtomicBool::new(false),
            abandon: CancellationToken::new(),
            counts: Default::default(),
        };
        Ok(Self { inner: Arc::new(inner) })
    }

    /// Replaces the channels (policy hot reload). Deliveries already started finish against
    /// the channel they started with.
    pub fn set_channels(&self, channels: &BTreeMap<String, AlertChannel>) {
        let resolved = Arc::new(resolve_all(channels));
        match self.inner.channels.write() {
            Ok(mut current) => *current = resolved,
            Err(poisoned) => *poisoned.into_inner() = resolved,
        }
    }

    /// Starts delivering `alert` to each channel its `notify` names (each name once) and
    /// returns the number of deliveries started. Never blocks and never fails: a channel that
    /// cannot be delivered to is logged and counted.
    ///
    /// Call it from within a Tokio runtime; deliveries run as tasks on it.
    pub fn notify(&self, alert: &Alert) -> usize {
        let mut deliveries = self.deliver(alert);
        let started = deliveries.started();
        // Left to run on their own: dropping a task's handle does not stop it.
        deliveries.0.clear();
        started
    }

    /// As [`Notifier::notify`], and the deliveries started, to wait for their end: the
    /// enforcer records an alert as delivered only once each of its channels has finished
    /// (delivered or given up).
    pub fn deliver(&self, alert: &Alert) -> Deliveries {
        let inner = &self.inner;
        let channels = inner.channels();
        let handle = tokio::runtime::Handle::try_current();
        let shared = Arc::new(alert.clone());
        let mut started = Vec::new();
        let mut seen = BTreeSet::new();
        for name in &alert.notify {
            if !seen.insert(name.as_str()) {
                continue;
            }
            let Some(channel) = channels.get(name) else {
                let kind = kind_label(kind_of_name(name));
                error!(alert = %alert.alert_id, channel = %name, "alert not delivered: channel is not defined in the policy");
                inner.count(kind, Outcome::Failed);
                continue;
            };
            let kind = kind_label(channel.kind);
            if let Err(problem) = &channel.target {
                error!(alert = %alert.alert_id, channel = %name, %problem, "alert not delivered: channel is not usable");
                inner.count(kind, Outcome::Failed);
                continue;
            }
            let handle = match &handle {
                Ok(handle) => handle,
                Err(e) => {
                    error!(alert = %alert.alert_id, channel = %name, error = %e, "alert not delivered: no async runtime");
                    inner.count(kind, Outcome::Dropped);
                    continue;
                }
            };
            if inner.closing.load(Ordering::Acquire) {
                error!(alert = %alert.alert_id, channel = %name, "alert not delivered: notifier is shutting down");
                inner.count(kind, Outcome::Dropped);
                continue;
            }
            let Some(pending) = Pending::reserve(inner) else {
                error!(
                    alert = %alert.alert_id,
                    channel = %name,
                    max_pending = inner.config.max_pending,
                    "alert not delivered: delivery queue is full"
                );
                inner.count(kind, Outcome::Dropped);
                continue;
            };
            started.push(handle.spawn(deliver(Arc::clone(inner), Arc::clone(channel), Arc::clone(&shared), pending)));
        }
        Deliveries(started)
    }

    /// Deliveries accepted and not finished.
    pub fn pending(&self) -> usize {
        *self.inner.pending.borrow()
    }

    pub fn stats(&self) -> DeliveryStats {
        let n = |o: Outcome| self.inner.counts[o.index()].load(Ordering::Relaxed);
        DeliveryStats {
            delivered: n(Outcome::Delivered),
            retried: n(Outcome::Retried),
            failed: n(Outcome::Failed),
            dropped: n(Outcome::Dropped),
        }
    }

    /// Waits until every accepted delivery has finished (delivered or given up), or `timeout`
    /// passes; returns how many are still pending (0 when all finished). Deliveries go on
    /// either way.
    pub async fn flush(&self, timeout: Duration) -> usize {
        let mut rx = self.inner.pending.subscribe();
        let _ = tokio::time::timeout(timeout, rx.wait_for(|n| *n == 0)).await;
        self.pending()
    }

    /// For shutdown: stops accepting alerts, waits up to `grace` for pending deliveries, then
    /// abandons the rest (each logged at error level and counted as dropped). Returns the
    /// number abandoned.
    pub async fn shutdown(&self, grace: Duration) -> usize {
        self.inner.closing.store(true, Ordering::Release);
        let left = self.flush(grace).await;
        if left > 0 {
            warn!(pending = left, grace_ms = grace.as_millis() as u64, "abandoning alert deliveries still pending");
            self.inner.abandon.cancel();
            self.flush(ABANDON_GRACE).await;
        }
        left
    }
}

/// The deliveries [`Notifier::deliver`] started for one alert.
#[must_use = "dropping it stops the deliveries; `finished` waits for them"]
pub struct Deliveries(Vec<tokio::task::JoinHandle<()>>);

impl Deliveries {
    pub fn started(&self) -> usize {
        self.0.len()
    }

    /// Waits until every delivery has ended, however (delivered, given up, or abandoned at
    /// shutdown; each is counted and logged by the delivery itself).
    pub async fn finished(mut self) {
        // Awaited in place: when this future is dropped part-way (its enforcer lost the lease),
        // `Drop` still holds the handles of the deliveries left, and stops them.
        for d in &mut self.0 {
            let _ = d.await;
        }
    }
}

impl Drop for Deliveries {
    /// Dropped before they finished (an enforcer that lost the lease stops): the deliveries stop
    /// too, retries included, so two enforcers do not both deliver an alert (the next active
    /// delivers what is not recorded as done).
    fn drop(&mut self) {
        for d in &self.0 {
            d.abort();
        }
    }
}

impl Inner {
    fn channels(&self) -> Arc<Channels> {
        match self.channels.read() {
            Ok(c) => Arc::clone(&c),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    fn count(&self, kind: &'static str, outcome: Outcome) {
        self.counts[outcome.index()].fetch_add(1, Ordering::Relaxed);
        counter!("tollgate_enforcer_alert_deliveries_total", "kind" => kind, "outcome" => outcome.as_str())
            .increment(1);
    }

    fn finish(&self, kind: &'static str, outcome: Outcome, started: Instant) {
        self.count(kind, outcome);
        histogram!("tollgate_enforcer_alert_delivery_seconds", "kind" => kind, "outcome" => outcome.as_str())
            .record(started.elapsed().as_secs_f64());
    }
}
