//! The ingress's Prometheus metrics, each declared once with its description.

use metrics::{Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};

pub fn describe() {
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
    describe_counter!(
        "tollgate_ingress_decisions_applied_total",
        "Breach decision records applied to the cache, by state (breached, watch, clear, tombstone)"
    );
    describe_counter!(
        "tollgate_ingress_decisions_ignored_total",
        "Breach decision records not applied, by reason (stale_version, undecodable, key_mismatch, no_key)"
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
    describe_gauge!("tollgate_ingress_queued_requests", "Requests held by queue_then_429, waiting for headroom");
}

pub fn request(endpoint: &'static str, virtual_model: &str, status: u16, seconds: f64) {
    let class = match status {
        200..=299 => "2xx",
        400..=499 => "4xx",
        _ => "5xx",
    };
    counter!("tollgate_ingress_requests_total", "endpoint" => endpoint, "virtual_model" => virtual_model.to_owned(), "status" => class).increment(1);
    histogram!("tollgate_ingress_request_duration_seconds", "endpoint" => endpoint).record(seconds);
}

pub fn tokens(virtual_model: &str, provider: &str, kind: &'static str, n: i64) {
    if n > 0 {
        counter!("tollgate_ingress_tokens_total", "virtual_model" => virtual_model.to_owned(), "provider" => provider.to_owned(), "kind" => kind)
            .increment(n.unsigned_abs());
    }
}

pub fn cost(virtual_model: &str, provider: &str, nanos: i64) {
    counter!("tollgate_ingress_cost_nanos_total", "virtual_model" => virtual_model.to_owned(), "provider" => provider.to_owned())
        .increment(nanos.unsigned_abs());
}

pub fn fallback(virtual_model: &str) {
    counter!("tollgate_ingress_fallbacks_total", "virtual_model" => virtual_model.to_owned()).increment(1);
}

pub fn publish_queue_depth(depth: usize) {
    gauge!("tollgate_ingress_publish_queue_depth").set(depth as f64);
}

pub fn event_published() {
    counter!("tollgate_ingress_events_published_total").increment(1);
}

pub fn event_dropped(reason: &'static str) {
    events_dropped(reason, 1);
}

pub fn events_dropped(reason: &'static str, n: u64) {
    counter!("tollgate_ingress_events_dropped_total", "reason" => reason).increment(n);
}

pub fn event_spooled() {
    counter!("tollgate_ingress_events_spooled_total").increment(1);
}

pub fn event_resent() {
    counter!("tollgate_ingress_events_resent_total").increment(1);
}

pub fn events_recovered(n: u64) {
    counter!("tollgate_ingress_events_recovered_total").increment(n);
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
    if n > 0 {
        counter!("tollgate_ingress_decision_lookups_total").increment(n);
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
