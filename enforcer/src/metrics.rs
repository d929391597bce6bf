//! The enforcer's Prometheus metrics, each declared once with its description.

use metrics::{counter, describe_counter, describe_gauge, gauge};

pub fn describe() {
    describe_counter!("tollgate_enforcer_events_total", "Usage events evaluated");
    describe_counter!(
        "tollgate_enforcer_decode_errors_total",
        "Usage events that could not be decoded (skipped, logged)"
    );
    describe_counter!("tollgate_enforcer_tokens_total", "Tokens seen on the usage stream, by kind");
    describe_counter!("tollgate_enforcer_cost_nanos_total", "Cost in nano-USD seen on the usage stream");
    describe_gauge!("tollgate_enforcer_policy_rules", "Rules loaded, by kind");
    describe_gauge!("tollgate_enforcer_event_age_seconds", "Age of the last evaluated event when it was read");
}

pub fn rules(kind: &'static str, n: usize) {
    gauge!("tollgate_enforcer_policy_rules", "kind" => kind).set(n as f64);
}

pub fn event(input: i64, output: i64, cost_nanos: i64, age_seconds: f64) {
    counter!("tollgate_enforcer_events_total").increment(1);
    counter!("tollgate_enforcer_tokens_total", "kind" => "input").increment(input.unsigned_abs());
    counter!("tollgate_enforcer_tokens_total", "kind" => "output").increment(output.unsigned_abs());
    counter!("tollgate_enforcer_cost_nanos_total").increment(cost_nanos.unsigned_abs());
    gauge!("tollgate_enforcer_event_age_seconds").set(age_seconds);
}

pub fn decode_error() {
    counter!("tollgate_enforcer_decode_errors_total").increment(1);
}
