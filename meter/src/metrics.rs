//! The meter's Prometheus metrics, each declared once with its description.

use metrics::{Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};

pub fn describe() {
    describe_counter!("tollgate_meter_events_consumed_total", "Usage events read from Kafka");
    describe_counter!("tollgate_meter_rows_inserted_total", "Usage rows written to ClickHouse");
    describe_counter!("tollgate_meter_decode_errors_total", "Usage events that could not be decoded (skipped, logged)");
    describe_counter!("tollgate_meter_insert_errors_total", "Failed ClickHouse inserts (retried)");
    describe_counter!("tollgate_meter_dead_lettered_total", "Undecodable usage events sent to the dead-letter topic");
    describe_counter!(
        "tollgate_meter_resent_events_total",
        "Copies of an already counted usage event (re-sent by an ingress): kept raw, not added to the rollups"
    );
    describe_counter!(
        "tollgate_meter_history_rows_total",
        "Breach decisions and alerts written to their history tables"
    );
    describe_counter!(
        "tollgate_meter_history_skipped_total",
        "Decision, alert or outcome records that could not be decoded (skipped, logged)"
    );
    describe_counter!("tollgate_meter_outcomes_rows_total", "Outcomes written to outcome_events");
    describe_counter!(
        "tollgate_meter_dead_letter_failures_total",
        "Undecodable usage events the dead-letter topic did not take"
    );
    describe_counter!(
        "tollgate_meter_rebalances_total",
        "Consumer-group rebalances answered, by event (assign, revoke, lost)"
    );
    describe_counter!(
        "tollgate_meter_rows_read_back_total",
        "Rollup rows read back from ClickHouse before a batch adds to them, by table (usage_windows, session_hours)"
    );
    describe_counter!(
        "tollgate_meter_windows_dropped_total",
        "Written rollup windows and session hours dropped from memory, by reason (passed: ended a while ago; cap: over the open-window cap)"
    );
    describe_gauge!("tollgate_meter_open_windows", "Rollup windows and session hours held in memory");
    describe_histogram!("tollgate_meter_batch_rows", "Rows per ClickHouse insert");
    describe_histogram!("tollgate_meter_insert_seconds", Unit::Seconds, "Time per ClickHouse insert");
}

pub fn read_back(windows: usize, sessions: usize) {
    counter!("tollgate_meter_rows_read_back_total", "table" => "usage_windows").increment(windows as u64);
    counter!("tollgate_meter_rows_read_back_total", "table" => "session_hours").increment(sessions as u64);
}

/// The counter of events read, fetched once by the consume loop: looking it up in the registry
/// for every message hashed its name each time.
pub fn consumed() -> metrics::Counter {
    counter!("tollgate_meter_events_consumed_total")
}

pub fn windows_dropped(reason: &'static str, n: usize) {
    if n > 0 {
        counter!("tollgate_meter_windows_dropped_total", "reason" => reason).increment(n as u64);
    }
}

pub fn open_windows(n: usize) {
    gauge!("tollgate_meter_open_windows").set(n as f64);
}

pub fn resent(n: usize) {
    if n > 0 {
        counter!("tollgate_meter_resent_events_total").increment(n as u64);
    }
}

pub fn decode_error() {
    counter!("tollgate_meter_decode_errors_total").increment(1);
}

pub fn insert_error() {
    counter!("tollgate_meter_insert_errors_total").increment(1);
}

pub fn inserted(rows: usize, seconds: f64) {
    counter!("tollgate_meter_rows_inserted_total").increment(rows as u64);
    histogram!("tollgate_meter_batch_rows").record(rows as f64);
    histogram!("tollgate_meter_insert_seconds").record(seconds);
}

pub fn dead_lettered() {
    counter!("tollgate_meter_dead_lettered_total").increment(1);
}

pub fn dead_letter_failed() {
    counter!("tollgate_meter_dead_letter_failures_total").increment(1);
}

/// `event`: `assign`, `revoke` or `lost` (a revoke after the group handed the partitions on).
pub fn rebalance(event: &'static str) {
    counter!("tollgate_meter_rebalances_total", "event" => event).increment(1);
}

pub fn history_written(rows: usize) {
    counter!("tollgate_meter_history_rows_total").increment(rows as u64);
}

pub fn outcomes_written(rows: usize) {
    counter!("tollgate_meter_outcomes_rows_total").increment(rows as u64);
}

pub fn history_skipped() {
    counter!("tollgate_meter_history_skipped_total").increment(1);
}
