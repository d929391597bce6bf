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
    describe_gauge!("tollgate_ingress_publish_queue_depth", "Usage events waiting for the producer task");
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
    counter!("tollgate_ingress_events_dropped_total", "reason" => reason).increment(1);
}
