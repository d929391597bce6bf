//! Breach decisions and alerts: what the enforcer publishes, as `schemas/avro/breach_decision.avsc`
//! and `schemas/avro/alert.avsc` define them.

use apache_avro::AvroSchema;
use serde::{Deserialize, Serialize};

use crate::avro::{AvroCodec, CodecError};

pub const BREACH_DECISION_AVSC: &str = include_str!("../avro/breach_decision.avsc");
pub const ALERT_AVSC: &str = include_str!("../avro/alert.avsc");

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "tollgate.v1")]
pub enum RuleKind {
    RateLimit,
    Budget,
    Guard,
}

impl RuleKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RuleKind::RateLimit => "rate_limit",
            RuleKind::Budget => "budget",
            RuleKind::Guard => "guard",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "tollgate.v1")]
pub enum DecisionState {
    /// Over the limit: requests of the scope get the action.
    Breached,
    /// Under the limit but close: ingresses count what they admit against `headroom`.
    Watch,
    /// Nothing to do.
    Clear,
}

impl DecisionState {
    pub fn as_str(self) -> &'static str {
        match self {
            DecisionState::Breached => "breached",
            DecisionState::Watch => "watch",
            DecisionState::Clear => "clear",
        }
    }
}

/// What a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "tollgate.v1")]
pub enum Measure {
    /// Input plus output tokens.
    Tokens,
    /// Requests that reached a provider.
    Requests,
    /// Cost in nano-USD.
    CostNanos,
}

impl Measure {
    pub fn as_str(self) -> &'static str {
        match self {
            Measure::Tokens => "tokens",
            Measure::Requests => "requests",
            Measure::CostNanos => "cost_nanos",
        }
    }

    /// The measure summed over `usage_events` rows, as an `Int64` aggregate: what a rule of this
    /// measure counts per request (`UsageEvent::total_tokens`, one request, `cost_nanos`). The
    /// rows a rule counts are `measures::ATTEMPTED_ROWS`.
    pub fn sql_sum(self) -> String {
        match self {
            Measure::Tokens => format!("toInt64(sum({}))", crate::usage::sql::TOTAL_TOKENS),
            Measure::Requests => "toInt64(count())".into(),
            Measure::CostNanos => "toInt64(sum(cost_nanos))".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "tollgate.v1")]
pub struct BreachDecision {
    pub rule_id: String,
    pub rule_kind: RuleKind,
    pub scope: String,
    pub state: DecisionState,
    pub action: String,
    pub audit: bool,
    pub cut_streams: bool,
    pub measure: Measure,
    pub limit: i64,
    pub observed: i64,
    pub headroom: i64,
    pub window_start_us: i64,
    pub window_end_us: i64,
    pub decided_at_us: i64,
    pub covered_until_us: i64,
    pub version: i64,
}

#[cfg(any(test, feature = "fixtures"))]
impl BreachDecision {
    /// A `hard_block` token rate limit's decision for tests, with limit 1,000 and everything
    /// else zero. Override what a test cares about with struct update syntax.
    pub fn example(rule_id: impl Into<String>, scope: impl Into<String>, state: DecisionState, version: i64) -> Self {
        BreachDecision {
            rule_id: rule_id.into(),
            rule_kind: RuleKind::RateLimit,
            scope: scope.into(),
            state,
            action: "hard_block".into(),
            audit: false,
            cut_streams: false,
            measure: Measure::Tokens,
            limit: 1000,
            observed: 0,
            headroom: 0,
            window_start_us: 0,
            window_end_us: 0,
            decided_at_us: 0,
            covered_until_us: 0,
            version,
        }
    }
}

impl BreachDecision {
    pub fn codec() -> Result<AvroCodec, CodecError> {
        AvroCodec::from_avsc(BREACH_DECISION_AVSC)
    }

    /// The Kafka key of the compacted topic: `rule_id/scope`.
    pub fn key(&self) -> String {
        decision_key(&self.rule_id, &self.scope)
    }
}

/// `rule_id/scope`, the key of `tollgate.breaches.v1`.
pub fn decision_key(rule_id: &str, scope: &str) -> String {
    let mut k = String::with_capacity(rule_id.len() + 1 + scope.len());
    decision_key_into(&mut k, rule_id, scope);
    k
}

/// [`decision_key`] written into `k` (emptied first), for a loop that reuses one buffer.
pub fn decision_key_into(k: &mut String, rule_id: &str, scope: &str) {
    k.clear();
    k.push_str(rule_id);
    k.push('/');
    k.push_str(scope);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "tollgate.v1")]
pub enum AlertKind {
    BudgetThreshold,
    RateLimitBreach,
    LoopGuard,
    ContextStuffing,
    TokenizerDrift,
    FrontierCostShare,
}

impl AlertKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::BudgetThreshold => "budget_threshold",
            AlertKind::RateLimitBreach => "rate_limit_breach",
            AlertKind::LoopGuard => "loop_guard",
            AlertKind::ContextStuffing => "context_stuffing",
            AlertKind::TokenizerDrift => "tokenizer_drift",
            AlertKind::FrontierCostShare => "frontier_cost_share",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "tollgate.v1")]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "tollgate.v1")]
pub struct Alert {
    pub alert_id: String,
    pub rule_id: String,
    pub kind: AlertKind,
    pub severity: Severity,
    pub scope: String,
    pub threshold_pct: i32,
    pub measure: Measure,
    pub limit: i64,
    pub observed: i64,
    pub window_start_us: i64,
    pub window_end_us: i64,
    pub raised_at_us: i64,
    pub summary: String,
    pub notify: Vec<String>,
}

impl Alert {
    pub fn codec() -> Result<AvroCodec, CodecError> {
        AvroCodec::from_avsc(ALERT_AVSC)
    }

    /// The id every copy of this alert carries: one per rule, scope, window and threshold.
    pub fn id_for(rule_id: &str, scope: &str, window_start_us: i64, threshold_pct: i32) -> String {
        format!("{rule_id}/{scope}/{window_start_us}/{threshold_pct}")
    }

    /// Until when an enforcer must remember this alert's id to raise it only once
    /// ([`Alert::kept_until_us`] of its kind and window).
    pub fn remembered_until_us(&self) -> i64 {
        Alert::kept_until_us(self.kind, self.window_start_us, self.window_end_us)
    }

    /// Until when an alert id of `kind` raised over `[window_start_us, window_end_us)` must be
    /// remembered: one window length past the window's end, by when the window its id names (a
    /// calendar period, a session-hour, a guard's period) has passed; a drift alert names a
    /// model version rather than a window, so for as long as the enforcer runs.
    pub fn kept_until_us(kind: AlertKind, window_start_us: i64, window_end_us: i64) -> i64 {
        match kind {
            AlertKind::TokenizerDrift => i64::MAX,
            _ => window_end_us.saturating_add(window_end_us.saturating_sub(window_start_us).max(0)),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rust_types_match_avsc() {
        assert_eq!(
            BreachDecision::codec().unwrap().canonical_form(),
            BreachDecision::get_schema().canonical_form(),
            "schemas/avro/breach_decision.avsc and BreachDecision have drifted apart"
        );
        assert_eq!(
            Alert::codec().unwrap().canonical_form(),
            Alert::get_schema().canonical_form(),
            "schemas/avro/alert.avsc and Alert have drifted apart"
        );
    }

    fn measure() -> impl Strategy<Value = Measure> {
        prop_oneof![Just(Measure::Tokens), Just(Measure::Requests), Just(Measure::CostNanos)]
    }

    prop_compose! {
        fn decision()(
            rule_id in "[a-z\\-]{1,20}", scope in "[a-zA-Z_:=\\-0-9]{0,30}",
            rule_kind in prop_oneof![Just(RuleKind::RateLimit), Just(RuleKind::Budget), Just(RuleKind::Guard)],
            state in prop_oneof![Just(DecisionState::Breached), Just(DecisionState::Watch), Just(DecisionState::Clear)],
            action in "[a-z_]{1,24}", flags in any::<(bool, bool)>(), measure in measure(),
            nums in proptest::array::uniform8(any::<i64>()),
        ) -> BreachDecision {
            BreachDecision {
                rule_id, rule_kind, scope, state, action, audit: flags.0, cut_streams: flags.1, measure,
                limit: nums[0], observed: nums[1], headroom: nums[2], window_start_us: nums[3],
                window_end_us: nums[4], decided_at_us: nums[5], covered_until_us: nums[7], version: nums[6],
            }
        }
    }

    proptest! {
        #[test]
        fn decisions_round_trip(d in decision()) {
            let codec = BreachDecision::codec().unwrap();
            let back: BreachDecision = codec.decode(&codec.encode(&d).unwrap()).unwrap();
            prop_assert_eq!(back, d);
        }

        #[test]
        fn alerts_round_trip(
            d in decision(), pct in 0i32..1000, summary in ".{0,40}",
            notify in proptest::collection::vec("[a-z]+:[#a-z\\-]+", 0..3),
            kind in prop_oneof![Just(AlertKind::BudgetThreshold), Just(AlertKind::LoopGuard), Just(AlertKind::TokenizerDrift)],
        ) {
            let a = Alert {
                alert_id: Alert::id_for(&d.rule_id, &d.scope, d.window_start_us, pct),
                rule_id: d.rule_id, kind, severity: Severity::Warning, scope: d.scope, threshold_pct: pct,
                measure: d.measure, limit: d.limit, observed: d.observed, window_start_us: d.window_start_us,
                window_end_us: d.window_end_us, raised_at_us: d.decided_at_us, summary, notify,
            };
            let codec = Alert::codec().unwrap();
            let back: Alert = codec.decode(&codec.encode(&a).unwrap()).unwrap();
            prop_assert_eq!(back, a);
        }
    }
}
