//! The reference's failure modes as measures, each defined once: which requests a measure
//! counts, as a predicate on a [`UsageEvent`] (the enforcer's guards) and as the SQL condition
//! that says the same over `usage_events` (the views, `tollgate-meter report`, the enforcer's
//! rebuild), plus how the figure is computed. What a request's tokens are is `usage`'s
//! (`prompt_tokens`, `total_tokens` and their `usage::sql` forms); this module says which
//! requests and which aggregate.
//!
//! Frontier cost share needs no row condition: it divides the cost on frontier models by all
//! cost, and a refused request costs nothing.

use crate::usage::{Status, TokenSource, UsageEvent};

/// Rate limits, budgets and the anomaly guards count every request Tollgate let through to a
/// provider, failed attempts included (a provider may bill them); a request Tollgate refused
/// reached none and costs nothing.
pub fn attempted(ev: &UsageEvent) -> bool {
    ev.status != Status::Rejected
}

/// [`attempted`] over `usage_events`.
pub const ATTEMPTED_ROWS: &str = "status != 'rejected'";

/// The [`attempted`] requests of a `usage_windows` row, whose `requests` counts refused ones
/// too (and `rejected` those alone). Its tokens and cost need no condition: a refused request
/// has none.
pub const ATTEMPTED_WINDOW_REQUESTS: &str = "(requests - rejected)";

/// Context stuffing (prompt tokens per request, per workflow) counts successful requests only:
/// a failed attempt's input may be an estimate, and a refused one read nothing.
pub fn stuffing_counts(ev: &UsageEvent) -> bool {
    ev.status == Status::Ok
}

/// [`stuffing_counts`] over `usage_events`.
pub const STUFFING_ROWS: &str = "status = 'ok'";

/// Tokenizer drift (the provider's prompt tokens per reference token, per model version) counts
/// successful requests whose counts came from the provider and that carry a reference count:
/// an estimated request's prompt tokens are the reference itself, which would pull every ratio
/// towards 1.
pub fn drift_counts(ev: &UsageEvent) -> bool {
    ev.status == Status::Ok
        && ev.token_source == TokenSource::Provider
        && ev.reference_input_tokens.is_some_and(|r| r > 0)
}

/// [`drift_counts`] over `usage_events`.
pub const DRIFT_ROWS: &str = "status = 'ok' AND token_source = 'provider' \
                              AND isNotNull(reference_input_tokens) AND assumeNotNull(reference_input_tokens) > 0";

/// Agent loops (a session-hour's tokens against a percentile of its workflow's session-hours)
/// count every request that reached a model, failed ones included (a provider may bill them);
/// a session-hour without tokens is not part of the population.
pub fn loop_counts(ev: &UsageEvent) -> bool {
    ev.status != Status::Rejected && ev.total_tokens() > 0
}

/// [`loop_counts`] over `usage_events` (the session-hours without tokens are left out by
/// [`SESSION_HOUR_HAS_TOKENS`] once summed).
pub const LOOP_ROWS: &str = "status != 'rejected'";

/// Keeps a session-hour whose token sum, named `tokens`, is above zero (a `HAVING` condition).
pub const SESSION_HOUR_HAS_TOKENS: &str = "tokens > 0";

/// The `level` quantile (0 < level ≤ 1) of the session-hour token sums in `column`: exact (one
/// of the values, not sampled or interpolated), wherever a loop figure is computed.
pub fn session_hour_quantile(level: f64, column: &str) -> String {
    format!("quantileExact({level:?})({column})")
}
