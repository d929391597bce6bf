//! One alert's delivery to one channel, run as a background task: the slot it holds in the
//! bounded pending count, the retry loop (capped exponential backoff with jitter, `Retry-After`
//! waited out, given up on a refusal, after `max_attempts` or `max_elapsed`, or when shutdown
//! abandons it), and the HTTP attempt itself with the alert id in its headers.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use metrics::{gauge, histogram};
use reqwest::StatusCode;
use reqwest::header::{CONTENT_TYPE, HeaderName, HeaderValue, RETRY_AFTER};
use sha2::{Digest, Sha256};
use tollgate_runtime::error_chain;
use tollgate_schemas::decision::Alert;
use tollgate_schemas::policy::ChannelKind;
use tracing::{error, info, warn};

use super::channel::{Channel, kind_label};
use super::payload::{pagerduty_payload, slack_payload, truncate, webhook_payload};
use super::{Inner, Outcome};

/// How much of a refusing receiver's answer goes into the log.
const ERROR_BODY_MAX: usize = 300;

const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
const ALERT_ID_HEADER: HeaderName = HeaderName::from_static("x-tollgate-alert-id");

impl Inner {
    /// The wait before retry number `retry` (1 for the first): capped exponential backoff
    /// with equal jitter.
    pub(super) fn backoff(&self, retry: u32) -> Duration {
        let factor = 1u32.checked_shl(retry.saturating_sub(1)).unwrap_or(u32::MAX);
        let base = self.config.initial_backoff.saturating_mul(factor).min(self.config.max_backoff);
        let half = base / 2;
        let spread = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
        half + Duration::from_nanos(rand::random_range(0..=spread))
    }
}

/// One accepted delivery, counted in `pending` until dropped (however the task ends).
pub(super) struct Pending(Arc<Inner>);

impl Pending {
    pub(super) fn reserve(inner: &Arc<Inner>) -> Option<Self> {
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
pub(super) fn retryable_status(status: StatusCode) -> bool {
    status == StatusCode::REQUEST_TIMEOUT || status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error()
}

/// `Retry-After` as delay-seconds or an HTTP-date (RFC 9110 §10.2.3); a date in the past is
/// no wait.
pub(super) fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = jiff::fmt::rfc2822::DateTimeParser::new().parse_timestamp(value).ok()?;
    let at = SystemTime::from(at);
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// One alert to one channel, retried until it lands or is given up.
pub(super) async fn deliver(inner: Arc<Inner>, channel: Arc<Channel>, alert: Arc<Alert>, _pending: Pending) {
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
