//! The ingress's Prometheus metrics, each declared once with its description.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, PoisonError, RwLock};

use metrics::{
    Counter, Histogram, Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};

/// Metric handles by one label value, made on first use. `counter!` with labels hashes the
/// name and every label and allocates the label strings on every call; the request path
/// instead finds its handles here under a read lock (label values come from the policy, so
/// the map stays small).
struct Handles<V>(RwLock<HashMap<String, Arc<V>>>);

impl<V> Handles<V> {
    fn new() -> Self {
        Self(RwLock::new(HashMap::new()))
    }

    fn get(&self, key: &str, make: impl FnOnce() -> V) -> Arc<V> {
        if let Some(v) = self.0.read().unwrap_or_else(PoisonError::into_inner).get(key) {
            return Arc::clone(v);
        }
        let mut map = self.0.write().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(map.entry(key.to_owned()).or_insert_with(|| Arc::new(make())))
    }
}

const ENDPOINTS: [&str; 3] = ["chat_completions", "messages", "embeddings"];
const STATUS_CLASSES: [&str; 3] = ["2xx", "4xx", "5xx"];

/// `tollgate_ingress_requests_total` by virtual model: one counter per endpoint and status class.
static REQUESTS: LazyLock<Handles<[Counter; 9]>> = LazyLock::new(Handles::new);
static DURATIONS: LazyLock<[Histogram; 3]> =
    LazyLock::new(|| ENDPOINTS.map(|e| histogram!("tollgate_ingress_request_duration_seconds", "endpoint" => e)));

/// Token and cost counters of one virtual model and provider.
pub struct UsageCounters {
    input: Counter,
    output: Counter,
    cached_read: Counter,
    cost_nanos: Counter,
}

/// By virtual model, then provider.
static USAGE: LazyLock<Handles<Handles<UsageCounters>>> = LazyLock::new(Handles::new);

pub fn describe() {
    describe_counter!(
        "tollgate_ingress_otlp_metric_attempts_after_shutdown_total",
        "Attempts that ended after the last OTLP metric export at shutdown, so never pushed"
    );
    describe_counter!(
        "tollgate_ingress_otlp_metric_exports_total",
        "OTLP metric exports, by result: exported, failed (the collector refused or was unreachable), timed_out, abandoned (under way at shutdown; the last export carries its totals)"
    );
    describe_counter!(
        "tollgate_ingress_trace_spans_total",
        "Trace spans, by result: exported, dropped_queue_full (the export queue was full), dropped_export_failed"
    );
    describe_counter!(
        "tollgate_ingress_outcomes_total",
        "Outcome posts (POST /v1/outcomes), by result: recorded, refused (4xx), not_recorded (5xx: the broker did not take it)"
    );
    describe_counter!(
        "tollgate_ingress_requests_total",
        "Requests answered, by endpoint, virtual model and status class"
    );
    describe_histogram!(
        "tollgate_ingress_request_duration_seconds",
        Unit::Seconds,
        "Time from request to response head, by endpoint"
    );
    describe_counter!(
        "tollgate_ingress_tokens_total",
        "Tokens counted on responses, by virtual model, provider and kind"
    );
    describe_counter!(
        "tollgate_ingress_cost_nanos_total",
        "Cost in nano-USD of answered requests, by virtual model and provider"
    );
    describe_counter!(
        "tollgate_ingress_fallbacks_total",
        "Times a request moved on to its next target, by virtual model"
    );
    describe_counter!("tollgate_ingress_events_published_total", "Usage events acknowledged by Kafka");
    describe_counter!("tollgate_ingress_events_dropped_total", "Usage events lost, by reason");
    describe_gauge!("tollgate_ingress_breaker_state", "Circuit breaker per target: 0 closed, 1 open, 2 half-open");
    describe_gauge!("tollgate_ingress_publish_queue_depth", "Usage events waiting for the producer task");
    describe_counter!(
        "tollgate_ingress_events_spooled_total",
        "Usage events written to the on-disk spool, each before it is sent to Kafka"
    );
    describe_counter!(
        "tollgate_ingress_events_resent_total",
        "Usage events sent to Kafka again: after a failed delivery, or left by an earlier run"
    );
    describe_counter!(
        "tollgate_ingress_events_recovered_total",
        "Usage events found in the spool at start, left unacknowledged by an earlier run"
    );
    describe_counter!(
        "tollgate_ingress_delivery_failures_total",
        "Failed Kafka deliveries of usage events (each is retried from the spool)"
    );
    describe_gauge!("tollgate_ingress_spool_records", "Usage events in the spool that Kafka has not acknowledged");
    describe_gauge!("tollgate_ingress_spool_bytes", Unit::Bytes, "Bytes of the spool's segment files on disk");
    describe_gauge!(
        "tollgate_ingress_decisions_ready",
        "1 once the breaches topic was read up to the watermarks taken at start; 0 while serving without it"
    );
    describe_gauge!("tollgate_ingress_decisions_cached", "Breach decisions held in the decision cache (keys)");
    describe_gauge!(
        "tollgate_ingress_anonymous",
        "1 when the policy serves requests without an API key (allow_anonymous: true), else 0"
    );
    describe_counter!(
        "tollgate_ingress_decisions_applied_total",
        "Breach decision records applied to the cache, by state (breached, watch, clear, tombstone)"
    );
    describe_counter!(
        "tollgate_ingress_decisions_ignored_total",
        "Breach decision records not applied, by reason (stale_version, future_version, undecodable, key_mismatch, no_key)"
    );
    describe_histogram!(
        "tollgate_ingress_decision_delay_seconds",
        Unit::Seconds,
        "From a decision's decided_at to its arrival in this ingress's cache (live records only)"
    );
    describe_counter!("tollgate_ingress_decision_consumer_errors_total", "Errors reading the breaches topic");
    describe_counter!(
        "tollgate_ingress_decision_lookups_total",
        "Decision cache lookups (one per applicable rule and request)"
    );
    describe_counter!(
        "tollgate_ingress_breach_actions_total",
        "Requests shaped by a breach decision, by rule and action taken (hard_block, queue_then_429, \
         queue_then_429:released, fallback_to_*, fallback_to_cheaper:already_cheapest, audit:*, cut_stream)"
    );
    describe_gauge!(
        "tollgate_ingress_own_counts",
        "Rule scopes this ingress counts its own admissions for (keys held; bounded by --own-count-keys)"
    );
    describe_counter!(
        "tollgate_ingress_own_counts_expired_total",
        "Own-count keys forgotten because everything they counted left the rule's window"
    );
    describe_counter!(
        "tollgate_ingress_own_counts_evicted_total",
        "Own-count keys dropped before their window passed to stay within --own-count-keys"
    );
    describe_gauge!("tollgate_ingress_queued_requests", "Requests held by queue_then_429, waiting for headroom");
    describe_counter!(
        "tollgate_ingress_intake_unjournaled_total",
        "Upstream attempts served without an intake record (journal full, too large, disk error), by reason"
    );
    describe_counter!(
        "tollgate_ingress_intake_interrupted_total",
        "Attempts an earlier run left unfinished in the intake journal, recorded as interrupted at start"
    );
    describe_gauge!(
        "tollgate_ingress_intake_bytes",
        Unit::Bytes,
        "Bytes of the intake journal on disk (held by the oldest attempt still in flight)"
    );
    describe_counter!(
        "tollgate_ingress_reference_counts_deferred_total",
        "Prompts too long to count on the request path: the reference count ran beside the upstream call"
    );
    describe_counter!(
        "tollgate_ingress_reference_counts_skipped_total",
        "Long prompts whose reference count was skipped (the counting queue was full): the linear estimate stands"
    );
}

/// `endpoint` is one of [`ENDPOINTS`].
pub fn request(endpoint: &'static str, virtual_model: &str, status: u16, seconds: f64) {
    let e = ENDPOINTS.iter().position(|x| *x == endpoint).unwrap_or(0);
    let class = match status {
        200..=299 => 0,
        400..=499 => 1,
        _ => 2,
    };
    let counters = REQUESTS.get(virtual_model, || {
        std::array::from_fn(|i| {
            counter!("tollgate_ingress_requests_total", "endpoint" => ENDPOINTS[i / 3],
                "virtual_model" => virtual_model.to_owned(), "status" => STATUS_CLASSES[i % 3])
        })
    });
    counters[e * 3 + class].increment(1);
    DURATIONS[e].record(seconds);
}

/// A request's tokens (`tollgate_ingress_tokens_total` by kind) and cost.
pub fn usage(virtual_model: &str, provider: &str, input: i64, output: i64, cached_read: i64, cost_nanos: i64) {
    let by_provider = USAGE.get(virtual_model, Handles::new);
    let c = by_provider.get(provider, || {
        let tokens = |kind: &'static str| {
            counter!("tollgate_ingress_tokens_total", "virtual_model" => virtual_model.to_owned(),
                "provider" => provider.to_owned(), "kind" => kind)
        };
        UsageCounters {
            input: tokens("input"),
            output: tokens("output"),
            cached_read: tokens("cached_read"),
            cost_nanos: counter!("tollgate_ingress_cost_nanos_total", "virtual_model" => virtual_model.to_owned(),
                "provider" => provider.to_owned()),
        }
    });
    for (counter, n) in
        [(&c.input, input), (&c.output, output), (&c.cached_read, cached_read), (&c.cost_nanos, cost_nanos)]
    {
        if n > 0 {
            counter.increment(n.unsigned_abs());
        }
    }
}

pub fn own_counts(keys: usize) {
    static KEYS: LazyLock<metrics::Gauge> = LazyLock::new(|| gauge!("tollgate_ingress_own_counts"));
    KEYS.set(keys as f64);
}

pub fn own_counts_expired(n: usize) {
    counter!("tollgate_ingress_own_counts_expired_total").increment(n as u64);
}

pub fn own_count_evicted() {
    static EVICTED: LazyLock<Counter> = LazyLock::new(|| counter!("tollgate_ingress_own_counts_evicted_total"));
    EVICTED.increment(1);
}

pub fn fallback(virtual_model: &str) {
    counter!("tollgate_ingress_fallbacks_total", "virtual_model" => virtual_model.to_owned()).increment(1);
}

pub fn publish_queue_depth(depth: usize) {
    static DEPTH: LazyLock<metrics::Gauge> = LazyLock::new(|| gauge!("tollgate_ingress_publish_queue_depth"));
    DEPTH.set(depth as f64);
}

pub fn events_published(n: u64) {
    counter!("tollgate_ingress_events_published_total").increment(n);
}

pub fn event_dropped(reason: &'static str) {
    events_dropped(reason, 1);
}

pub fn events_dropped(reason: &'static str, n: u64) {
    counter!("tollgate_ingress_events_dropped_total", "reason" => reason).increment(n);
}

pub fn events_spooled(n: u64) {
    counter!("tollgate_ingress_events_spooled_total").increment(n);
}

pub fn event_resent() {
    counter!("tollgate_ingress_events_resent_total").increment(1);
}

pub fn events_recovered(n: u64) {
    counter!("tollgate_ingress_events_recovered_total").increment(n);
}

pub fn intake_unjournaled(reason: &'static str) {
    counter!("tollgate_ingress_intake_unjournaled_total", "reason" => reason).increment(1);
}

pub fn intake_interrupted(n: u64) {
    counter!("tollgate_ingress_intake_interrupted_total").increment(n);
}

pub fn intake_depth(bytes: u64) {
    gauge!("tollgate_ingress_intake_bytes").set(bytes as f64);
}

pub fn reference_count_skipped() {
    counter!("tollgate_ingress_reference_counts_skipped_total").increment(1);
}

pub fn reference_count_deferred() {
    counter!("tollgate_ingress_reference_counts_deferred_total").increment(1);
}

pub fn delivery_failed() {
    counter!("tollgate_ingress_delivery_failures_total").increment(1);
}

pub fn spool_depth(records: u64, bytes: u64) {
    gauge!("tollgate_ingress_spool_records").set(records as f64);
    gauge!("tollgate_ingress_spool_bytes").set(bytes as f64);
}

pub fn breaker_state(target: &str, state: u8) {
    gauge!("tollgate_ingress_breaker_state", "target" => target.to_owned()).set(f64::from(state));
}

pub fn anonymous(allowed: bool) {
    gauge!("tollgate_ingress_anonymous").set(if allowed { 1.0 } else { 0.0 });
}

pub fn decisions_ready(ready: bool) {
    gauge!("tollgate_ingress_decisions_ready").set(if ready { 1.0 } else { 0.0 });
}

pub fn decisions_cached(keys: usize) {
    gauge!("tollgate_ingress_decisions_cached").set(keys as f64);
}

pub fn decision_applied(state: &'static str) {
    counter!("tollgate_ingress_decisions_applied_total", "state" => state).increment(1);
}

pub fn decision_ignored(reason: &'static str) {
    counter!("tollgate_ingress_decisions_ignored_total", "reason" => reason).increment(1);
}

pub fn decision_delay(seconds: f64) {
    histogram!("tollgate_ingress_decision_delay_seconds").record(seconds);
}

pub fn decision_consumer_error() {
    counter!("tollgate_ingress_decision_consumer_errors_total").increment(1);
}

pub fn decision_lookups(n: u64) {
    static LOOKUPS: LazyLock<Counter> = LazyLock::new(|| counter!("tollgate_ingress_decision_lookups_total"));
    if n > 0 {
        LOOKUPS.increment(n);
    }
}

/// `rule` comes from policy (bounded); `action` from a fixed set plus the policy's fallback names.
pub fn breach_action(rule: &str, action: &str) {
    counter!("tollgate_ingress_breach_actions_total", "rule" => rule.to_owned(), "action" => action.to_owned())
        .increment(1);
}

pub fn queued_requests(n: usize) {
    gauge!("tollgate_ingress_queued_requests").set(n as f64);
}

/// One answered `POST /v1/outcomes`, by its status.
pub fn outcome(status: u16) {
    let result = match status {
        200..=299 => "recorded",
        400..=499 => "refused",
        _ => "not_recorded",
    };
    counter!("tollgate_ingress_outcomes_total", "result" => result).increment(1);
}

/// One OTLP metric export: `exported`, `failed` or `timed_out`.
pub fn otlp_metric_export(result: &'static str) {
    counter!("tollgate_ingress_otlp_metric_exports_total", "result" => result).increment(1);
}

/// An attempt that ended after the last metric export at shutdown (a request cut at the end of
/// the grace period): its measurements were never pushed.
pub fn otlp_metric_attempt_after_shutdown() {
    counter!("tollgate_ingress_otlp_metric_attempts_after_shutdown_total").increment(1);
}

/// `n` spans that ended as `result` (`exported`, `dropped_queue_full`, `dropped_export_failed`).
pub fn trace_spans(result: &'static str, n: u64) {
    counter!("tollgate_ingress_trace_spans_total", "result" => result).increment(n);
}
