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

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use metrics::{Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use reqwest::StatusCode;
use reqwest::header::{CONTENT_TYPE, HeaderName, HeaderValue, RETRY_AFTER};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tollgate_schemas::decision::{Alert, AlertKind, Measure, Severity};
use tollgate_schemas::policy::{AlertChannel, ChannelKind};
use tollgate_schemas::price::{group_thousands, usd};
use tracing::{error, info, warn};

/// `source` of every PagerDuty event.
const PAGERDUTY_SOURCE: &str = "tollgate";
/// PagerDuty's limits on `payload.summary` and `dedup_key`, in characters.
const PAGERDUTY_SUMMARY_MAX: usize = 1024;
const PAGERDUTY_DEDUP_KEY_MAX: usize = 255;
/// Slack's limits: header text, section text, one section field.
const SLACK_HEADER_MAX: usize = 150;
const SLACK_SECTION_MAX: usize = 3000;
const SLACK_FIELD_MAX: usize = 2000;
/// How much of a refusing receiver's answer goes into the log.
const ERROR_BODY_MAX: usize = 300;
/// After [`Notifier::shutdown`] abandons deliveries, how long it waits for them to count
/// themselves.
const ABANDON_GRACE: Duration = Duration::from_secs(1);

const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
const ALERT_ID_HEADER: HeaderName = HeaderName::from_static("x-tollgate-alert-id");

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

fn kind_label(kind: Option<ChannelKind>) -> &'static str {
    match kind {
        Some(ChannelKind::Slack) => "slack",
        Some(ChannelKind::PagerDuty) => "pagerduty",
        Some(ChannelKind::Webhook) => "webhook",
        None => "unknown",
    }
}

/// The kind a channel name says, for names the policy does not define.
fn kind_of_name(name: &str) -> Option<ChannelKind> {
    match name.split_once(':')?.0 {
        "slack" => Some(ChannelKind::Slack),
        "pagerduty" => Some(ChannelKind::PagerDuty),
        "webhook" => Some(ChannelKind::Webhook),
        _ => None,
    }
}

/// Why a channel cannot be delivered to at all; found when the channels are set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum Unusable {
    #[error("channel kind is not slack, pagerduty or webhook")]
    UnknownKind,
    #[error("channel has no url (url_env {0:?} is not set)")]
    NoUrl(Option<String>),
    #[error("channel url is not a valid http(s) URL")]
    BadUrl,
    #[error("pagerduty channel has no routing key (routing_key_env {0:?} is not set)")]
    NoRoutingKey(Option<String>),
}

/// A channel resolved for delivery: URL and routing key read from the environment.
struct Channel {
    name: String,
    kind: Option<ChannelKind>,
    target: Result<reqwest::Url, Unusable>,
    routing_key: Option<String>,
}

/// Names only: the URL and the routing key are secrets.
impl fmt::Debug for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Channel").field("name", &self.name).field("kind", &self.kind).finish_non_exhaustive()
    }
}

impl Channel {
    fn resolve(c: &AlertChannel) -> Self {
        let kind = c.kind();
        let routing_key = c
            .routing_key
            .clone()
            .or_else(|| c.routing_key_env.as_ref().and_then(|v| std::env::var(v).ok()))
            .filter(|k| !k.is_empty());
        let target = match (kind, c.resolve_url()) {
            (None, _) => Err(Unusable::UnknownKind),
            (Some(_), None) => Err(Unusable::NoUrl(c.url_env.clone())),
            (Some(kind), Some(url)) => match reqwest::Url::parse(&url) {
                Ok(u) if matches!(u.scheme(), "http" | "https") => {
                    if kind == ChannelKind::PagerDuty && routing_key.is_none() {
                        Err(Unusable::NoRoutingKey(c.routing_key_env.clone()))
                    } else {
                        Ok(u)
                    }
                }
                _ => Err(Unusable::BadUrl),
            },
        };
        Self { name: c.name.clone(), kind, target, routing_key }
    }
}

type Channels = BTreeMap<String, Arc<Channel>>;

fn resolve_all(channels: &BTreeMap<String, AlertChannel>) -> Channels {
    channels
        .iter()
        .map(|(name, c)| {
            let resolved = Channel::resolve(c);
            if let Err(problem) = &resolved.target {
                warn!(channel = %name, %problem, "alert channel cannot be delivered to");
            }
            (name.clone(), Arc::new(resolved))
        })
        .collect()
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
        let inner = &self.inner;
        let channels = inner.channels();
        let handle = tokio::runtime::Handle::try_current();
        let shared = Arc::new(alert.clone());
        let mut started = 0;
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
            handle.spawn(deliver(Arc::clone(inner), Arc::clone(channel), Arc::clone(&shared), pending));
            started += 1;
        }
        started
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

    /// The wait before retry number `retry` (1 for the first): capped exponential backoff
    /// with equal jitter.
    fn backoff(&self, retry: u32) -> Duration {
        let factor = 1u32.checked_shl(retry.saturating_sub(1)).unwrap_or(u32::MAX);
        let base = self.config.initial_backoff.saturating_mul(factor).min(self.config.max_backoff);
        let half = base / 2;
        let spread = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
        half + Duration::from_nanos(rand::random_range(0..=spread))
    }
}

/// One accepted delivery, counted in `pending` until dropped (however the task ends).
struct Pending(Arc<Inner>);

impl Pending {
    fn reserve(inner: &Arc<Inner>) -> Option<Self> {
        let max = inner.config.max_pending;
        let reserved = inner.pending.send_if_modified(|n| {
            if *n < max {
                *n += 1;
                gauge!("tollgate_enforcer_alert_deliveries_pending").set(*n as f64);
                true
            } else {
                false
            }
        });
        reserved.then(|| Pending(Arc::clone(inner)))
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.pending.send_modify(|n| {
            *n = n.saturating_sub(1);
            gauge!("tollgate_enforcer_alert_deliveries_pending").set(*n as f64);
        });
    }
}

/// Why one attempt did not land.
#[derive(Debug, thiserror::Error)]
enum AttemptError {
    /// The receiver answered, but not 2xx.
    #[error("receiver answered {status}: {body}")]
    Status { status: StatusCode, retry_after: Option<Duration>, body: String },
    /// No answer: connect error, timeout, connection dropped (the error carries no URL).
    #[error("{}", error_chain(.0))]
    Transport(reqwest::Error),
}

use tollgate_runtime::error_chain;

impl AttemptError {
    /// Whether another attempt may succeed.
    fn retryable(&self) -> bool {
        match self {
            AttemptError::Status { status, .. } => retryable_status(*status),
            AttemptError::Transport(e) => !(e.is_builder() || e.is_redirect()),
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            AttemptError::Status { retry_after, .. } => *retry_after,
            AttemptError::Transport(_) => None,
        }
    }
}

/// 408, 429 and 5xx may pass on a later try; any other non-2xx answer will not.
fn retryable_status(status: StatusCode) -> bool {
    status == StatusCode::REQUEST_TIMEOUT || status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error()
}

/// `Retry-After` as delay-seconds or an HTTP-date (RFC 9110 §10.2.3); a date in the past is
/// no wait.
fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = jiff::fmt::rfc2822::DateTimeParser::new().parse_timestamp(value).ok()?;
    let at = SystemTime::from(at);
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// One alert to one channel, retried until it lands or is given up.
async fn deliver(inner: Arc<Inner>, channel: Arc<Channel>, alert: Arc<Alert>, _pending: Pending) {
    let started = Instant::now();
    let kind = kind_label(channel.kind);
    let Ok(url) = &channel.target else {
        // `notify` only starts deliveries to usable channels.
        inner.finish(kind, Outcome::Failed, started);
        return;
    };
    let body = match channel.kind {
        Some(ChannelKind::Slack) => slack_payload(&alert),
        Some(ChannelKind::PagerDuty) => pagerduty_payload(&alert, channel.routing_key.as_deref().unwrap_or_default()),
        Some(ChannelKind::Webhook) | None => webhook_payload(&alert),
    };
    let body = body.to_string();
    let id_header = alert_id_header(&alert.alert_id);
    let max_attempts = inner.config.max_attempts.max(1);
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let result = tokio::select! {
            biased;
            () = inner.abandon.cancelled() => {
                error!(alert = %alert.alert_id, channel = %channel.name, attempt, "alert not delivered: abandoned at shutdown");
                inner.finish(kind, Outcome::Dropped, started);
                return;
            }
            result = send(&inner, kind, &channel, url, &body, &id_header) => result,
        };
        let problem = match result {
            Ok(status) => {
                info!(alert = %alert.alert_id, channel = %channel.name, attempt, %status, "alert delivered");
                inner.finish(kind, Outcome::Delivered, started);
                return;
            }
            Err(problem) => problem,
        };
        if !problem.retryable() {
            error!(alert = %alert.alert_id, channel = %channel.name, attempt, %problem, "alert not delivered: refused");
            inner.finish(kind, Outcome::Failed, started);
            return;
        }
        if attempt >= max_attempts {
            error!(alert = %alert.alert_id, channel = %channel.name, attempt, %problem, "alert not delivered: attempts exhausted");
            inner.finish(kind, Outcome::Failed, started);
            return;
        }
        let delay = problem.retry_after().unwrap_or_else(|| inner.backoff(attempt));
        if started.elapsed() + delay > inner.config.max_elapsed {
            error!(
                alert = %alert.alert_id,
                channel = %channel.name,
                attempt,
                delay_ms = delay.as_millis() as u64,
                %problem,
                "alert not delivered: retry would start after max_elapsed"
            );
            inner.finish(kind, Outcome::Failed, started);
            return;
        }
        warn!(
            alert = %alert.alert_id,
            channel = %channel.name,
            attempt,
            delay_ms = delay.as_millis() as u64,
            %problem,
            "alert delivery failed, retrying"
        );
        inner.count(kind, Outcome::Retried);
        tokio::select! {
            biased;
            () = inner.abandon.cancelled() => {
                error!(alert = %alert.alert_id, channel = %channel.name, attempt, "alert not delivered: abandoned at shutdown");
                inner.finish(kind, Outcome::Dropped, started);
                return;
            }
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// One HTTP attempt; Ok with the 2xx status.
async fn send(
    inner: &Inner,
    kind: &'static str,
    channel: &Channel,
    url: &reqwest::Url,
    body: &str,
    id_header: &HeaderValue,
) -> Result<StatusCode, AttemptError> {
    // Never closed; without a permit the attempt still goes out rather than being lost.
    let _permit = inner.permits.acquire().await.ok();
    let t = Instant::now();
    let mut request = inner
        .http
        .post(url.clone())
        .header(CONTENT_TYPE, "application/json")
        .header(ALERT_ID_HEADER, id_header.clone())
        .body(body.to_owned());
    if channel.kind == Some(ChannelKind::Webhook) {
        request = request.header(IDEMPOTENCY_KEY, id_header.clone());
    }
    let result = request.send().await;
    let outcome = match result {
        Err(e) => Err(AttemptError::Transport(e.without_url())),
        Ok(response) if response.status().is_success() => Ok(response.status()),
        Ok(mut response) => {
            let status = response.status();
            let retry_after = response
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| parse_retry_after(v, SystemTime::now()));
            let body = match response.chunk().await {
                Ok(Some(chunk)) => truncate(String::from_utf8_lossy(&chunk).trim(), ERROR_BODY_MAX),
                Ok(None) | Err(_) => String::new(),
            };
            Err(AttemptError::Status { status, retry_after, body })
        }
    };
    histogram!("tollgate_enforcer_alert_attempt_seconds", "kind" => kind).record(t.elapsed().as_secs_f64());
    outcome
}

/// The alert id as a header value; an id a header cannot carry (not printable ASCII) is sent
/// as its SHA-256, which is just as stable.
fn alert_id_header(alert_id: &str) -> HeaderValue {
    let printable = !alert_id.is_empty() && alert_id.bytes().all(|b| b == b' ' || b.is_ascii_graphic());
    if printable {
        if let Ok(v) = HeaderValue::from_str(alert_id) {
            return v;
        }
    }
    let digest = format!("{:x}", Sha256::digest(alert_id.as_bytes()));
    HeaderValue::from_str(&digest).unwrap_or(HeaderValue::from_static("tollgate-alert"))
}

// ---------------------------------------------------------------------------------------
// payloads
// ---------------------------------------------------------------------------------------

/// `value` of `measure` for people: nano-USD as dollars (`$1,234.57`, or four decimals under
/// a dollar), tokens and requests as whole numbers with thousands separators.
/// `-1,234` style.
fn signed_thousands(v: i64) -> String {
    format!("{}{}", if v < 0 { "-" } else { "" }, group_thousands(v.unsigned_abs()))
}

pub fn format_amount(measure: Measure, value: i64) -> String {
    match measure {
        Measure::CostNanos => usd(value),
        Measure::Tokens => format!("{} tokens", signed_thousands(value)),
        Measure::Requests => {
            let noun = if value == 1 { "request" } else { "requests" };
            format!("{} {noun}", signed_thousands(value))
        }
    }
}

/// `observed` as a whole percentage of `limit`, when there is a limit.
fn percent_of_limit(observed: i64, limit: i64) -> Option<i64> {
    (limit > 0).then(|| i64::try_from(i128::from(observed) * 100 / i128::from(limit)).unwrap_or(i64::MAX))
}

fn title(alert: &Alert) -> String {
    match alert.kind {
        AlertKind::BudgetThreshold => format!("Budget {}% reached", alert.threshold_pct),
        AlertKind::RateLimitBreach => "Rate limit breached".to_owned(),
        AlertKind::LoopGuard => "Agent loop detected".to_owned(),
        AlertKind::ContextStuffing => "Context stuffing detected".to_owned(),
        AlertKind::TokenizerDrift => "Tokenizer drift detected".to_owned(),
        AlertKind::FrontierCostShare => "Frontier-model cost share too high".to_owned(),
    }
}

fn severity_emoji(severity: Severity) -> &'static str {
    match severity {
        Severity::Critical => ":rotating_light:",
        Severity::Warning => ":warning:",
        Severity::Info => ":information_source:",
    }
}

/// `$812.40 of $1,000.00 (81%)`.
fn observed_vs_limit(alert: &Alert) -> String {
    let observed = format_amount(alert.measure, alert.observed);
    let limit = format_amount(alert.measure, alert.limit);
    match percent_of_limit(alert.observed, alert.limit) {
        Some(pct) => format!("{observed} of {limit} ({pct}%)"),
        None => format!("{observed} of {limit}"),
    }
}

/// One line for people who see nothing else: the alert's own summary, or one made up.
fn summary_line(alert: &Alert) -> String {
    let summary = alert.summary.trim();
    if summary.is_empty() {
        format!("{} for {}: {}, rule {}", title(alert), alert.scope, observed_vs_limit(alert), alert.rule_id)
    } else {
        summary.to_owned()
    }
}

fn timestamp(us: i64) -> Option<jiff::Timestamp> {
    jiff::Timestamp::from_microsecond(us).ok()
}

/// RFC 3339 in UTC, or the raw microseconds when out of range.
fn rfc3339(us: i64) -> String {
    timestamp(us).map_or_else(|| us.to_string(), |t| t.to_string())
}

fn short_time(us: i64) -> String {
    timestamp(us).map_or_else(|| us.to_string(), |t| t.strftime("%Y-%m-%d %H:%M").to_string())
}

/// At most `max` characters, the last one `…` when cut.
fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_owned();
    }
    let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// Slack treats `&`, `<` and `>` as markup (`<!channel>` pings everyone).
fn slack_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

fn slack_code(s: &str) -> String {
    format!("`{}`", slack_escape(s).replace('`', "'"))
}

fn slack_field(label: &str, value: &str) -> Value {
    json!({"type": "mrkdwn", "text": truncate(&format!("*{label}*\n{value}"), SLACK_FIELD_MAX)})
}

/// A Slack incoming-webhook message: `text` is what notifications show, `blocks` the message.
pub fn slack_payload(alert: &Alert) -> Value {
    let title = title(alert);
    let severity = alert.severity.as_str();
    let fallback = format!(
        "[{}] {title}: {} ({}) {}",
        severity.to_uppercase(),
        slack_escape(&alert.scope),
        slack_escape(&alert.rule_id),
        observed_vs_limit(alert)
    );
    let header = format!("{} {title}: {}", severity_emoji(alert.severity), alert.scope);
    let mut fields = vec![
        slack_field("Rule", &slack_code(&alert.rule_id)),
        slack_field("Scope", &slack_code(&alert.scope)),
        slack_field("Observed", &format_amount(alert.measure, alert.observed)),
        slack_field("Limit", &format_amount(alert.measure, alert.limit)),
    ];
    if let Some(pct) = percent_of_limit(alert.observed, alert.limit) {
        fields.push(slack_field("Used", &format!("{pct}% of limit")));
    }
    if alert.threshold_pct > 0 {
        fields.push(slack_field("Threshold", &format!("{}%", alert.threshold_pct)));
    }
    fields.push(slack_field("Severity", severity));
    let context = format!(
        "Window {} – {} UTC · alert {} · Tollgate",
        short_time(alert.window_start_us),
        short_time(alert.window_end_us),
        slack_code(&alert.alert_id)
    );
    json!({
        "text": truncate(&fallback, SLACK_SECTION_MAX),
        "blocks": [
            {"type": "header", "text": {"type": "plain_text", "text": truncate(&header, SLACK_HEADER_MAX), "emoji": true}},
            {"type": "section", "text": {"type": "mrkdwn", "text": truncate(&slack_escape(&summary_line(alert)), SLACK_SECTION_MAX)}},
            {"type": "section", "fields": fields},
            {"type": "context", "elements": [{"type": "mrkdwn", "text": truncate(&context, SLACK_SECTION_MAX)}]},
        ],
    })
}

/// The alert id as a PagerDuty `dedup_key` (at most 255 characters; a longer id keeps its
/// start and ends in its SHA-256, so distinct ids stay distinct).
fn dedup_key(alert_id: &str) -> String {
    if alert_id.chars().count() <= PAGERDUTY_DEDUP_KEY_MAX {
        return alert_id.to_owned();
    }
    let digest = format!("{:x}", Sha256::digest(alert_id.as_bytes()));
    let keep = PAGERDUTY_DEDUP_KEY_MAX - digest.len() - 1;
    let head: String = alert_id.chars().take(keep).collect();
    format!("{head}#{digest}")
}

/// A PagerDuty Events API v2 `trigger` event, deduplicated on the alert id.
pub fn pagerduty_payload(alert: &Alert, routing_key: &str) -> Value {
    let severity = match alert.severity {
        Severity::Critical => "critical",
        Severity::Warning => "warning",
        Severity::Info => "info",
    };
    json!({
        "routing_key": routing_key,
        "event_action": "trigger",
        "dedup_key": dedup_key(&alert.alert_id),
        "client": "Tollgate",
        "payload": {
            "summary": truncate(&summary_line(alert), PAGERDUTY_SUMMARY_MAX),
            "source": PAGERDUTY_SOURCE,
            "severity": severity,
            "timestamp": rfc3339(alert.raised_at_us),
            "component": alert.scope,
            "group": alert.rule_id,
            "class": alert.kind.as_str(),
            "custom_details": {
                "alert_id": alert.alert_id,
                "rule_id": alert.rule_id,
                "kind": alert.kind.as_str(),
                "scope": alert.scope,
                "measure": alert.measure.as_str(),
                "observed": alert.observed,
                "limit": alert.limit,
                "observed_display": format_amount(alert.measure, alert.observed),
                "limit_display": format_amount(alert.measure, alert.limit),
                "percent_of_limit": percent_of_limit(alert.observed, alert.limit),
                "threshold_pct": alert.threshold_pct,
                "window_start": rfc3339(alert.window_start_us),
                "window_end": rfc3339(alert.window_end_us),
            },
        },
    })
}

/// The alert itself, every field, as `tollgate_schemas::decision::Alert` serializes.
pub fn webhook_payload(alert: &Alert) -> Value {
    serde_json::to_value(alert).unwrap_or_else(|e| {
        // Strings, integers and unit enums always serialize; kept total all the same.
        error!(alert = %alert.alert_id, error = %e, "alert cannot be serialized as JSON");
        json!({"alert_id": alert.alert_id, "summary": alert.summary})
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::collections::{HashMap, VecDeque};
    use std::net::SocketAddr;
    use std::sync::Mutex;

    use axum::Router;
    use axum::extract::{Path, State};
    use axum::http::{HeaderMap, StatusCode as AxumStatus};
    use axum::response::{IntoResponse, Response};
    use axum::routing::post;

    use super::*;

    const ENV_URL: &str = "TOLLGATE_NOTIFY_TEST_URL";
    const ENV_KEY: &str = "TOLLGATE_NOTIFY_TEST_ROUTING_KEY";
    const UNSET_ENV: &str = "TOLLGATE_NOTIFY_TEST_NEVER_SET_7f3c";

    /// How the test receiver answers one post.
    #[derive(Clone, Debug)]
    enum Reply {
        Status(u16),
        RetryAfter(u16, &'static str),
        /// Answers 200 after this long (longer than the client's timeout in the tests).
        Stall(Duration),
    }

    #[derive(Clone, Debug)]
    struct Hit {
        path: String,
        at: Instant,
        headers: HeaderMap,
        body: Value,
    }

    #[derive(Default)]
    struct Script {
        hits: Vec<Hit>,
        replies: HashMap<String, VecDeque<Reply>>,
    }

    /// An in-process webhook receiver on 127.0.0.1:0 that records every post and answers as
    /// scripted per path (200 once the script runs out).
    #[derive(Clone, Default)]
    struct Receiver {
        addr: Option<SocketAddr>,
        script: Arc<Mutex<Script>>,
    }

    impl Receiver {
        async fn start(script: &[(&str, &[Reply])]) -> Self {
            let mut s = Script::default();
            for (path, replies) in script {
                s.replies.insert(format!("/{path}"), replies.iter().cloned().collect());
            }
            let script = Arc::new(Mutex::new(s));
            let app = Router::new().route("/{*path}", post(receive)).with_state(Arc::clone(&script));
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(async move { axum::serve(listener, app).await });
            Self { addr: Some(addr), script }
        }

        fn url(&self, path: &str) -> String {
            format!("http://{}/{path}", self.addr.unwrap())
        }

        fn hits(&self) -> Vec<Hit> {
            self.script.lock().unwrap().hits.clone()
        }
    }

    async fn receive(
        State(script): State<Arc<Mutex<Script>>>,
        Path(path): Path<String>,
        headers: HeaderMap,
        body: String,
    ) -> Response {
        let path = format!("/{path}");
        let body = serde_json::from_str(&body).unwrap_or(Value::String(body));
        let reply = {
            let mut s = script.lock().unwrap();
            s.hits.push(Hit { path: path.clone(), at: Instant::now(), headers, body });
            s.replies.get_mut(&path).and_then(VecDeque::pop_front)
        };
        let status = |code: u16| AxumStatus::from_u16(code).unwrap();
        match reply {
            None => (AxumStatus::OK, "ok").into_response(),
            Some(Reply::Status(code)) => (status(code), "scripted").into_response(),
            Some(Reply::RetryAfter(code, after)) => (status(code), [("retry-after", after)], "later").into_response(),
            Some(Reply::Stall(d)) => {
                tokio::time::sleep(d).await;
                (AxumStatus::OK, "late").into_response()
            }
        }
    }

    fn fast() -> NotifyConfig {
        NotifyConfig {
            connect_timeout: Duration::from_millis(500),
            request_timeout: Duration::from_secs(2),
            max_attempts: 5,
            max_elapsed: Duration::from_secs(30),
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(40),
            max_pending: 100,
            max_in_flight: 4,
        }
    }

    fn channel(name: &str, url: Option<String>) -> AlertChannel {
        AlertChannel { name: name.to_owned(), url, url_env: None, routing_key: None, routing_key_env: None }
    }

    fn channels(list: Vec<AlertChannel>) -> BTreeMap<String, AlertChannel> {
        list.into_iter().map(|c| (c.name.clone(), c)).collect()
    }

    /// 2025-06-01T00:00:00Z.
    const JUNE_US: i64 = 1_748_736_000_000_000;
    /// 2025-07-01T00:00:00Z.
    const JULY_US: i64 = 1_751_328_000_000_000;

    fn alert(notify: &[&str]) -> Alert {
        Alert {
            alert_id: Alert::id_for("search-monthly", "team:search", JUNE_US, 80),
            rule_id: "search-monthly".to_owned(),
            kind: AlertKind::BudgetThreshold,
            severity: Severity::Warning,
            scope: "team:search".to_owned(),
            threshold_pct: 80,
            measure: Measure::CostNanos,
            limit: 1_000_000_000_000,
            observed: 812_400_000_000,
            window_start_us: JUNE_US,
            window_end_us: JULY_US,
            raised_at_us: JUNE_US + 1_234_567,
            summary: "team:search spent $812.40 of its $1,000.00 monthly budget".to_owned(),
            notify: notify.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    #[test]
    fn amounts_read_as_dollars_and_whole_numbers() {
        assert_eq!(format_amount(Measure::CostNanos, 812_400_000_000), "$812.40");
        assert_eq!(format_amount(Measure::CostNanos, 1_000_000_000_000), "$1,000.00");
        assert_eq!(format_amount(Measure::CostNanos, 1_234_567_891_000_000), "$1,234,567.891");
        assert_eq!(format_amount(Measure::CostNanos, 4_200_000), "$0.0042");
        assert_eq!(format_amount(Measure::CostNanos, 999_990_000), "$0.99999", "exact, never rounded");
        assert_eq!(format_amount(Measure::CostNanos, 0), "$0.00");
        assert_eq!(format_amount(Measure::CostNanos, -2_500_000_000), "-$2.50");
        assert_eq!(format_amount(Measure::Tokens, 1_234_567), "1,234,567 tokens");
        assert_eq!(format_amount(Measure::Tokens, 999), "999 tokens");
        assert_eq!(format_amount(Measure::Requests, 1), "1 request");
        assert_eq!(format_amount(Measure::Requests, 12_000), "12,000 requests");
    }

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480); // Wed, 21 Oct 2015 07:28:00 GMT
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now), Some(Duration::from_secs(30)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let inner = Notifier::new(&BTreeMap::new(), fast()).unwrap().inner;
        for _ in 0..50 {
            let first = inner.backoff(1);
            assert!(first >= Duration::from_millis(5) && first <= Duration::from_millis(10), "{first:?}");
            let second = inner.backoff(2);
            assert!(second >= Duration::from_millis(10) && second <= Duration::from_millis(20), "{second:?}");
            let capped = inner.backoff(40);
            assert!(capped >= Duration::from_millis(20) && capped <= Duration::from_millis(40), "{capped:?}");
        }
    }

    #[test]
    fn statuses_are_retried_or_not() {
        for code in [408, 429, 500, 502, 503, 504] {
            assert!(retryable_status(StatusCode::from_u16(code).unwrap()), "{code}");
        }
        for code in [301, 400, 401, 403, 404, 410, 413, 422] {
            assert!(!retryable_status(StatusCode::from_u16(code).unwrap()), "{code}");
        }
    }

    #[test]
    fn slack_payload_has_text_and_readable_blocks() {
        let mut a = alert(&["slack:#ai-budget-alerts"]);
        a.scope = "team:<search>&co".to_owned();
        let p = slack_payload(&a);
        let text = p["text"].as_str().unwrap();
        assert!(text.contains("$812.40 of $1,000.00 (81%)"), "{text}");
        assert!(text.contains("team:&lt;search&gt;&amp;co"), "markup is escaped: {text}");
        let blocks = p["blocks"].as_array().unwrap();
        assert_eq!(blocks[0]["type"], "header");
        assert_eq!(blocks[0]["text"]["type"], "plain_text");
        assert!(blocks[0]["text"]["text"].as_str().unwrap().contains("Budget 80% reached"));
        assert_eq!(blocks[1]["type"], "section");
        assert_eq!(blocks[1]["text"]["type"], "mrkdwn");
        assert_eq!(blocks[1]["text"]["text"], "team:search spent $812.40 of its $1,000.00 monthly budget");
        let fields: Vec<&str> =
            blocks[2]["fields"].as_array().unwrap().iter().map(|f| f["text"].as_str().unwrap()).collect();
        assert_eq!(
            fields,
            [
                "*Rule*\n`search-monthly`",
                "*Scope*\n`team:&lt;search&gt;&amp;co`",
                "*Observed*\n$812.40",
                "*Limit*\n$1,000.00",
                "*Used*\n81% of limit",
                "*Threshold*\n80%",
                "*Severity*\nwarning",
            ]
        );
        assert_eq!(blocks[3]["type"], "context");
        let context = blocks[3]["elements"][0]["text"].as_str().unwrap();
        assert!(context.contains("2025-06-01 00:00 – 2025-07-01 00:00 UTC"), "{context}");

        let mut tokens = alert(&[]);
        tokens.measure = Measure::Tokens;
        tokens.limit = 5_000_000;
        tokens.observed = 5_250_000;
        tokens.summary.clear();
        let p = slack_payload(&tokens);
        assert!(p["text"].as_str().unwrap().contains("5,250,000 tokens of 5,000,000 tokens (105%)"));
        assert_eq!(
            p["blocks"][1]["text"]["text"],
            "Budget 80% reached for team:search: 5,250,000 tokens of 5,000,000 tokens (105%), rule search-monthly"
        );
    }

    #[test]
    fn pagerduty_payload_is_an_events_v2_trigger() {
        let mut a = alert(&["pagerduty:platform"]);
        a.severity = Severity::Critical;
        let p = pagerduty_payload(&a, "R0UT1NGKEY");
        assert_eq!(p["routing_key"], "R0UT1NGKEY");
        assert_eq!(p["event_action"], "trigger");
        assert_eq!(p["dedup_key"], a.alert_id.as_str());
        let payload = &p["payload"];
        assert_eq!(payload["summary"], a.summary.as_str());
        assert_eq!(payload["source"], "tollgate");
        assert_eq!(payload["severity"], "critical");
        assert_eq!(payload["timestamp"], "2025-06-01T00:00:01.234567Z");
        assert_eq!(payload["component"], "team:search");
        assert_eq!(payload["group"], "search-monthly");
        assert_eq!(payload["class"], "budget_threshold");
        let details = &payload["custom_details"];
        assert_eq!(details["observed"], 812_400_000_000i64);
        assert_eq!(details["limit_display"], "$1,000.00");
        assert_eq!(details["percent_of_limit"], 81);
        assert_eq!(details["window_end"], "2025-07-01T00:00:00Z");

        for (severity, expected) in [(Severity::Warning, "warning"), (Severity::Info, "info")] {
            a.severity = severity;
            assert_eq!(pagerduty_payload(&a, "k")["payload"]["severity"], expected);
        }

        a.summary = "x".repeat(2000);
        a.alert_id = "y".repeat(300);
        let p = pagerduty_payload(&a, "k");
        assert_eq!(p["payload"]["summary"].as_str().unwrap().chars().count(), 1024);
        let key = p["dedup_key"].as_str().unwrap();
        assert_eq!(key.chars().count(), 255);
        a.alert_id.push('z');
        assert_ne!(pagerduty_payload(&a, "k")["dedup_key"].as_str().unwrap(), key, "long ids stay distinct");
    }

    #[tokio::test]
    async fn slack_and_webhook_payloads_over_http() {
        let rx = Receiver::start(&[("finops", &[Reply::Status(202)])]).await;
        let map = channels(vec![
            channel("slack:#ai-budget-alerts", Some(rx.url("slack"))),
            channel("webhook:finops", Some(rx.url("finops"))),
        ]);
        let notifier = Notifier::new(&map, fast()).unwrap();
        let a = alert(&["slack:#ai-budget-alerts", "webhook:finops", "webhook:finops"]);
        assert_eq!(notifier.notify(&a), 2, "each channel once");
        assert_eq!(notifier.flush(Duration::from_secs(10)).await, 0);
        assert_eq!(notifier.stats(), DeliveryStats { delivered: 2, ..Default::default() });

        let hits = rx.hits();
        assert_eq!(hits.len(), 2);
        let hit = |path: &str| hits.iter().find(|h| h.path == path).unwrap();
        for h in &hits {
            assert_eq!(h.headers["content-type"], "application/json");
            assert_eq!(h.headers["x-tollgate-alert-id"], a.alert_id.as_str());
        }
        let slack = hit("/slack");
        assert!(slack.body["text"].as_str().unwrap().contains("$812.40 of $1,000.00"));
        assert_eq!(slack.body["blocks"].as_array().unwrap().len(), 4);
        assert!(!slack.headers.contains_key("idempotency-key"));

        let finops = hit("/finops");
        assert_eq!(finops.headers["idempotency-key"], a.alert_id.as_str());
        let back: Alert = serde_json::from_value(finops.body.clone()).unwrap();
        assert_eq!(back, a, "the webhook body is the whole alert");
        assert_eq!(finops.body["observed"], 812_400_000_000i64);
    }

    #[tokio::test]
    async fn two_503s_then_200_is_one_delivery_after_three_attempts() {
        let rx = Receiver::start(&[("hook", &[Reply::Status(503), Reply::Status(503), Reply::Status(200)])]).await;
        let notifier = Notifier::new(&channels(vec![channel("webhook:finops", Some(rx.url("hook")))]), fast()).unwrap();
        notifier.notify(&alert(&["webhook:finops"]));
        assert_eq!(notifier.flush(Duration::from_secs(10)).await, 0);
        assert_eq!(rx.hits().len(), 3);
        assert_eq!(notifier.stats(), DeliveryStats { delivered: 1, retried: 2, failed: 0, dropped: 0 });
        let ids: BTreeSet<_> = rx.hits().iter().map(|h| h.headers["idempotency-key"].clone()).collect();
        assert_eq!(ids.len(), 1, "every attempt carries the same idempotency key");
    }

    #[tokio::test]
    async fn retry_after_is_honoured() {
        let rx = Receiver::start(&[("hook", &[Reply::RetryAfter(429, "1")])]).await;
        let notifier = Notifier::new(&channels(vec![channel("webhook:finops", Some(rx.url("hook")))]), fast()).unwrap();
        notifier.notify(&alert(&["webhook:finops"]));
        assert_eq!(notifier.flush(Duration::from_secs(10)).await, 0);
        let hits = rx.hits();
        assert_eq!(hits.len(), 2);
        let gap = hits[1].at - hits[0].at;
        assert!(gap >= Duration::from_millis(950), "waited {gap:?}, Retry-After asked 1s (backoff alone is 10ms)");
        assert_eq!(notifier.stats(), DeliveryStats { delivered: 1, retried: 1, failed: 0, dropped: 0 });
    }

    #[tokio::test]
    async fn a_retry_after_beyond_max_elapsed_gives_up_at_once() {
        let rx = Receiver::start(&[("hook", &[Reply::RetryAfter(503, "3600")])]).await;
        let notifier = Notifier::new(&channels(vec![channel("webhook:finops", Some(rx.url("hook")))]), fast()).unwrap();
        notifier.notify(&alert(&["webhook:finops"]));
        assert_eq!(notifier.flush(Duration::from_secs(5)).await, 0);
        assert_eq!(rx.hits().len(), 1);
        assert_eq!(notifier.stats(), DeliveryStats { failed: 1, ..Default::default() });
    }

    #[tokio::test]
    async fn client_errors_are_not_retried() {
        let rx = Receiver::start(&[("hook", &[Reply::Status(400)]), ("gone", &[Reply::Status(404)])]).await;
        let map = channels(vec![
            channel("webhook:finops", Some(rx.url("hook"))),
            channel("slack:#gone", Some(rx.url("gone"))),
        ]);
        let notifier = Notifier::new(&map, fast()).unwrap();
        notifier.notify(&alert(&["webhook:finops", "slack:#gone"]));
        assert_eq!(notifier.flush(Duration::from_secs(10)).await, 0);
        assert_eq!(rx.hits().len(), 2, "one attempt each");
        assert_eq!(notifier.stats(), DeliveryStats { failed: 2, ..Default::default() });
    }

    #[tokio::test]
    async fn timeouts_are_retried() {
        let rx = Receiver::start(&[("hook", &[Reply::Stall(Duration::from_secs(5))])]).await;
        let config = NotifyConfig { request_timeout: Duration::from_millis(200), ..fast() };
        let notifier = Notifier::new(&channels(vec![channel("webhook:finops", Some(rx.url("hook")))]), config).unwrap();
        notifier.notify(&alert(&["webhook:finops"]));
        assert_eq!(notifier.flush(Duration::from_secs(10)).await, 0);
        assert_eq!(rx.hits().len(), 2);
        assert_eq!(notifier.stats(), DeliveryStats { delivered: 1, retried: 1, failed: 0, dropped: 0 });
    }

    #[tokio::test]
    async fn connect_errors_are_retried_up_to_max_attempts() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let config = NotifyConfig { max_attempts: 3, ..fast() };
        let notifier =
            Notifier::new(&channels(vec![channel("webhook:finops", Some(format!("http://{addr}/hook")))]), config)
                .unwrap();
        notifier.notify(&alert(&["webhook:finops"]));
        assert_eq!(notifier.flush(Duration::from_secs(10)).await, 0);
        assert_eq!(notifier.stats(), DeliveryStats { delivered: 0, retried: 2, failed: 1, dropped: 0 });
    }

    #[tokio::test]
    async fn unknown_and_unusable_channels_are_counted_not_fatal() {
        let rx = Receiver::start(&[]).await;
        let mut env_url = channel("webhook:from-env", None);
        env_url.url_env = Some(UNSET_ENV.to_owned());
        let mut keyless = channel("pagerduty:platform", Some(rx.url("pd")));
        keyless.routing_key_env = Some(UNSET_ENV.to_owned());
        let map = channels(vec![
            channel("webhook:finops", Some(rx.url("finops"))),
            env_url,
            keyless,
            channel("slack:#bad-url", Some("not a url".to_owned())),
        ]);
        let notifier = Notifier::new(&map, fast()).unwrap();
        let a = alert(&[
            "slack:#nobody-defined-this",
            "webhook:from-env",
            "pagerduty:platform",
            "slack:#bad-url",
            "webhook:finops",
        ]);
        assert_eq!(notifier.notify(&a), 1);
        assert_eq!(notifier.flush(Duration::from_secs(10)).await, 0);
        assert_eq!(notifier.stats(), DeliveryStats { delivered: 1, failed: 4, ..Default::default() });
        let hits = rx.hits();
        assert_eq!(hits.len(), 1);
        assert_eq!(hits[0].path, "/finops");
    }

    #[tokio::test]
    async fn set_channels_takes_effect_for_the_next_alert() {
        let rx = Receiver::start(&[]).await;
        let notifier = Notifier::new(&channels(vec![channel("webhook:finops", Some(rx.url("old")))]), fast()).unwrap();
        notifier.notify(&alert(&["webhook:finops"]));
        notifier.set_channels(&channels(vec![channel("webhook:finops", Some(rx.url("new")))]));
        notifier.notify(&alert(&["webhook:finops"]));
        assert_eq!(notifier.flush(Duration::from_secs(10)).await, 0);
        let mut paths: Vec<String> = rx.hits().into_iter().map(|h| h.path).collect();
        paths.sort();
        assert_eq!(paths, ["/new", "/old"]);
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts() {
        let rx = Receiver::start(&[("hook", &[Reply::Stall(Duration::from_millis(300))])]).await;
        let config = NotifyConfig { max_pending: 1, ..fast() };
        let notifier = Notifier::new(&channels(vec![channel("webhook:finops", Some(rx.url("hook")))]), config).unwrap();
        let a = alert(&["webhook:finops"]);
        assert_eq!(notifier.notify(&a), 1);
        assert_eq!(notifier.notify(&a), 0);
        assert_eq!(notifier.notify(&a), 0);
        assert_eq!(notifier.pending(), 1);
        assert_eq!(notifier.flush(Duration::from_secs(10)).await, 0);
        assert_eq!(notifier.stats(), DeliveryStats { delivered: 1, dropped: 2, ..Default::default() });
    }

    #[tokio::test]
    async fn notify_returns_before_the_delivery_and_shutdown_abandons_what_is_left() {
        // The receiver holds each request for 30 s: a notify that waited on the delivery could
        // not return with it still pending and no attempt ended.
        let rx = Receiver::start(&[("hook", &[Reply::Stall(Duration::from_secs(30))])]).await;
        let config = NotifyConfig { request_timeout: Duration::from_secs(30), ..fast() };
        let notifier = Notifier::new(&channels(vec![channel("webhook:finops", Some(rx.url("hook")))]), config).unwrap();
        assert_eq!(notifier.notify(&alert(&["webhook:finops"])), 1);
        assert_eq!((notifier.pending(), notifier.stats()), (1, DeliveryStats::default()));
        assert_eq!(notifier.flush(Duration::from_millis(300)).await, 1, "still in flight");
        assert_eq!(notifier.shutdown(Duration::from_millis(100)).await, 1);
        assert_eq!(notifier.pending(), 0);
        assert_eq!(notifier.notify(&alert(&["webhook:finops"])), 0, "closed");
        assert_eq!(notifier.stats(), DeliveryStats { dropped: 2, ..Default::default() });
    }

    /// Runs `env_child` in a child process with the variables set (this crate forbids the
    /// `unsafe` that setting them in-process takes).
    #[tokio::test]
    async fn url_env_and_routing_key_env_are_read() {
        let rx = Receiver::start(&[("pd", &[Reply::Status(202)])]).await;
        let out = tokio::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "notify::tests::env_child", "--ignored", "--nocapture", "--test-threads=1"])
            .env(ENV_URL, rx.url("pd"))
            .env(ENV_KEY, "R0UT1NGKEY")
            .output()
            .await
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        assert!(stdout.contains("1 passed"), "the child ran the test: {stdout}");
        let hits = rx.hits();
        assert_eq!(hits.len(), 1);
        assert_eq!(hits[0].headers["content-type"], "application/json");
        assert_eq!(hits[0].body["routing_key"], "R0UT1NGKEY");
        assert_eq!(hits[0].body["event_action"], "trigger");
        assert_eq!(hits[0].body["dedup_key"], alert(&[]).alert_id.as_str());
        assert_eq!(hits[0].body["payload"]["source"], "tollgate");
    }

    #[tokio::test]
    #[ignore = "run by url_env_and_routing_key_env_are_read with the variables set"]
    async fn env_child() {
        if std::env::var_os(ENV_URL).is_none() {
            return;
        }
        let pd = AlertChannel {
            name: "pagerduty:platform".to_owned(),
            url: None,
            url_env: Some(ENV_URL.to_owned()),
            routing_key: None,
            routing_key_env: Some(ENV_KEY.to_owned()),
        };
        let notifier = Notifier::new(&channels(vec![pd]), fast()).unwrap();
        assert_eq!(notifier.notify(&alert(&["pagerduty:platform"])), 1);
        assert_eq!(notifier.flush(Duration::from_secs(10)).await, 0);
        assert_eq!(notifier.stats(), DeliveryStats { delivered: 1, ..Default::default() });
    }
}
