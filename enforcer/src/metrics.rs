//! The enforcer's Prometheus metrics, each declared once with its description.

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};

pub fn describe() {
    describe_counter!("tollgate_enforcer_events_total", "Usage events evaluated");
    describe_counter!(
        "tollgate_enforcer_decode_errors_total",
        "Usage events not counted: undecodable or implausible (negative amounts), copied to the dead-letter topic"
    );
    describe_counter!("tollgate_enforcer_duplicate_events_total", "Usage events seen twice (re-sent), counted once");
    describe_counter!(
        "tollgate_enforcer_doubtful_events_total",
        "Events that ended before an event id the enforcer forgot, decided against event_positions once the meter passed them, by outcome"
    );
    describe_gauge!(
        "tollgate_enforcer_doubtful_waiting",
        "Doubtful events waiting for the meter to pass their offsets"
    );
    describe_gauge!("tollgate_enforcer_seen_ids", "Event ids of counted events remembered");
    describe_counter!(
        "tollgate_enforcer_keys_evaluated_total",
        "Rate-limit and budget keys evaluated: those counted into, and those in force whose verdict time alone may have changed"
    );
    describe_counter!(
        "tollgate_enforcer_seen_ids_forgotten_total",
        "Event ids forgotten once the meter recorded their positions"
    );
    describe_counter!(
        "tollgate_enforcer_seen_ids_evicted_total",
        "Event ids forgotten before the meter recorded them, past the enforcer's cap; their copies wait for the meter"
    );
    describe_counter!("tollgate_enforcer_tokens_total", "Tokens seen on the usage stream, by kind");
    describe_counter!("tollgate_enforcer_cost_nanos_total", "Cost in nano-USD seen on the usage stream");
    describe_gauge!("tollgate_enforcer_policy_rules", "Rules loaded, by kind");
    describe_gauge!("tollgate_enforcer_scopes", "Rule scopes with live counters");
    describe_counter!("tollgate_enforcer_decisions_total", "Breach decisions published, by rule kind and state");
    describe_counter!(
        "tollgate_enforcer_tombstones_total",
        "Decision keys tombstoned on the breaches topic: their last word was Clear and their window holds nothing"
    );
    describe_counter!(
        "tollgate_enforcer_alert_ids_expired_total",
        "Alert ids forgotten because their window has passed (an alert is raised once per scope and window)"
    );
    describe_counter!("tollgate_enforcer_alerts_total", "Alerts raised, by kind");
    describe_counter!("tollgate_enforcer_publish_errors_total", "Decisions or alerts Kafka did not take (retried)");
    describe_histogram!(
        "tollgate_enforcer_evaluation_lag_seconds",
        "From the oldest event of a batch ending to the batch's decisions being published"
    );
}

pub fn rules(kind: &'static str, n: usize) {
    gauge!("tollgate_enforcer_policy_rules", "kind" => kind).set(n as f64);
}

/// The counters every event adds to, fetched from the registry once (a lookup hashes the name
/// and labels each time).
pub struct EventCounters {
    events: metrics::Counter,
    input: metrics::Counter,
    output: metrics::Counter,
    cost: metrics::Counter,
}

impl Default for EventCounters {
    fn default() -> Self {
        EventCounters {
            events: counter!("tollgate_enforcer_events_total"),
            input: counter!("tollgate_enforcer_tokens_total", "kind" => "input"),
            output: counter!("tollgate_enforcer_tokens_total", "kind" => "output"),
            cost: counter!("tollgate_enforcer_cost_nanos_total"),
        }
    }
}

impl EventCounters {
    pub fn event(&self, input: i64, output: i64, cost_nanos: i64) {
        self.events.increment(1);
        self.input.increment(input.unsigned_abs());
        self.output.increment(output.unsigned_abs());
        self.cost.increment(cost_nanos.unsigned_abs());
    }
}

/// A doubtful event (see `seen`) decided: `counted`, `duplicate`, or `unverified` (counted
/// without waiting, because too many were waiting).
pub fn doubtful(outcome: &'static str) {
    counter!("tollgate_enforcer_doubtful_events_total", "outcome" => outcome).increment(1);
}

pub fn doubtful_waiting(n: usize) {
    gauge!("tollgate_enforcer_doubtful_waiting").set(n as f64);
}

/// Event ids remembered, and those forgotten since the last call: once the meter recorded them,
/// or evicted before (past `seen_max_ids`).
pub fn seen_ids(held: usize, forgotten: usize, evicted: usize) {
    gauge!("tollgate_enforcer_seen_ids").set(held as f64);
    counter!("tollgate_enforcer_seen_ids_forgotten_total").increment(forgotten as u64);
    counter!("tollgate_enforcer_seen_ids_evicted_total").increment(evicted as u64);
}

/// Keys an evaluation looked at: those counted into and those whose verdict time may change.
pub fn keys_evaluated(n: usize) {
    counter!("tollgate_enforcer_keys_evaluated_total").increment(n as u64);
}

pub fn duplicate() {
    counter!("tollgate_enforcer_duplicate_events_total").increment(1);
}

pub fn decode_error() {
    counter!("tollgate_enforcer_decode_errors_total").increment(1);
}

pub fn scopes(n: usize) {
    gauge!("tollgate_enforcer_scopes").set(n as f64);
}

pub fn evaluated(_events: usize, lag_seconds: f64) {
    histogram!("tollgate_enforcer_evaluation_lag_seconds").record(lag_seconds);
}

pub fn decision(kind: &'static str, state: &'static str) {
    counter!("tollgate_enforcer_decisions_total", "kind" => kind, "state" => state).increment(1);
}

pub fn tombstones(n: u64) {
    if n > 0 {
        counter!("tollgate_enforcer_tombstones_total").increment(n);
    }
}

pub fn alert_ids_expired(n: u64) {
    if n > 0 {
        counter!("tollgate_enforcer_alert_ids_expired_total").increment(n);
    }
}

pub fn alert(kind: &'static str) {
    counter!("tollgate_enforcer_alerts_total", "kind" => kind).increment(1);
}

pub fn publish_error(what: &'static str) {
    counter!("tollgate_enforcer_publish_errors_total", "what" => what).increment(1);
}

/// Whether this enforcer holds the lease and publishes (1) or stands by (0).
pub fn active(active: bool) {
    describe_gauge!(
        "tollgate_enforcer_active",
        "1 while this enforcer holds the lease and publishes, 0 while it stands by"
    );
    gauge!("tollgate_enforcer_active").set(if active { 1.0 } else { 0.0 });
}

/// A takeover attempt, by outcome (taken, failed).
pub fn takeover(outcome: &'static str) {
    describe_counter!(
        "tollgate_enforcer_takeovers_total",
        "Attempts to take the lease over, by outcome (taken, failed)"
    );
    counter!("tollgate_enforcer_takeovers_total", "outcome" => outcome).increment(1);
}

/// The broker refused this enforcer's writes: another one took the lease.
pub fn fenced() {
    describe_counter!(
        "tollgate_enforcer_fenced_total",
        "Times this enforcer lost the lease (its writes fenced) and stood by again"
    );
    counter!("tollgate_enforcer_fenced_total").increment(1);
}

/// Alerts whose every channel finished (delivered or given up), written as done to the lease.
pub fn alerts_recorded(n: u64) {
    describe_counter!(
        "tollgate_enforcer_alerts_recorded_total",
        "Alerts whose deliveries all finished (delivered or given up), written as done to the lease topic (a next active does not deliver them again)"
    );
    counter!("tollgate_enforcer_alerts_recorded_total").increment(n);
}
