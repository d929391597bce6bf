//! Outcomes: results a team counts (a merged PR, a resolved ticket), joined to the spend that
//! produced them, as `schemas/avro/outcome.avsc` defines them.

use apache_avro::AvroSchema;
use serde::{Deserialize, Serialize};

use crate::avro::{AvroCodec, CodecError};
use crate::usage::Envelope;

/// The `.avsc` this type must match; `tests::rust_type_matches_avsc` fails when they drift.
pub const OUTCOME_AVSC: &str = include_str!("../avro/outcome.avsc");

/// Longest outcome id, kind, or session id an outcome may carry.
pub const MAX_ID_LEN: usize = 256;
/// Most sessions, and most traces, one outcome may name.
pub const MAX_SESSIONS: usize = 1_000;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "tollgate.v1")]
pub struct Outcome {
    pub outcome_id: String,
    pub kind: String,
    pub value: Option<f64>,
    pub occurred_at_us: i64,
    pub received_at_us: i64,
    pub envelope: Envelope,
    pub api_key_id: Option<String>,
    pub session_ids: Vec<String>,
    pub trace_ids: Vec<String>,
}

impl Outcome {
    pub fn codec() -> Result<AvroCodec, CodecError> {
        AvroCodec::from_avsc(OUTCOME_AVSC)
    }

    /// The Kafka key: `project/outcome_id`, so every copy of one outcome lands on one partition.
    pub fn key(&self) -> String {
        format!("{}/{}", self.envelope.project.as_deref().unwrap_or(""), self.outcome_id)
    }
}

/// Whether `kind` is a word: a lowercase letter, then lowercase letters, digits or `_`, at most
/// 64 in all (`merged_pr`, `resolved_ticket`).
pub fn valid_kind(kind: &str) -> bool {
    let mut chars = kind.chars();
    kind.len() <= 64
        && chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// Cost per outcome, as SQL: the one definition the views (migration 0010) and
/// `tollgate-meter report cost-per-outcome` both use.
///
/// A usage row (`usage_events FINAL`) is *spent on* outcomes of a kind when, in the same bucket
/// (a month in the views, the report's whole period), an outcome of that kind, of the same
/// project and of the same group (team, workflow, …, by the report's grouping) names its session
/// or its trace, or names neither sessions nor traces and carries its (non-empty) workflow tag.
/// Every other row is spend that produced no outcome of that kind. A group's outcomes are so
/// only ever weighed against its own spend: an outcome posted under one team that names another
/// team's session links nothing, rather than giving one team outcomes and the other their cost.
pub mod sql {
    /// How a [`cost_per_outcome`] query buckets and filters.
    pub struct Shape<'a> {
        /// The grouping column, the same name in `usage_events` and `outcome_events`
        /// (`team`, `workflow_tag`, `project`, …).
        pub group: &'a str,
        /// The bucket of an outcome (over `occurred_at`) and of a usage row (over `ended_at`).
        pub outcome_bucket: &'a str,
        pub usage_bucket: &'a str,
        /// The kinds a usage row is weighed against: a quoted literal, or an `arrayJoin` of all.
        pub usage_kind: &'a str,
        /// Which outcomes count, and which usage rows.
        pub outcome_cond: &'a str,
        pub usage_cond: &'a str,
    }

    /// One row per (bucket, kind, group): `outcomes`, `value` (their values summed),
    /// `outcome_cost_nanos` (spend on them) and `other_cost_nanos` (spend on none of that kind).
    pub fn cost_per_outcome(db: &str, s: &Shape<'_>) -> String {
        let Shape { group, outcome_bucket, usage_bucket, usage_kind, outcome_cond, usage_cond } = s;
        let outcomes = format!("{db}.outcome_events FINAL WHERE {outcome_cond}");
        format!(
            "SELECT bucket, kind, key, toUInt64(sum(n)) AS outcomes, sum(v) AS value, \
               sum(spent) AS outcome_cost_nanos, sum(unspent) AS other_cost_nanos FROM ( \
               SELECT {outcome_bucket} AS bucket, kind, {group} AS key, count() AS n, \
                 sum(ifNull(value, 0)) AS v, toInt64(0) AS spent, toInt64(0) AS unspent \
               FROM {outcomes} GROUP BY bucket, kind, key \
             UNION ALL \
               SELECT bucket, kind, key, toUInt64(0) AS n, toFloat64(0) AS v, \
                 toInt64(sumIf(cost_nanos, linked)) AS spent, toInt64(sumIf(cost_nanos, NOT linked)) AS unspent \
               FROM ( \
                 SELECT {usage_bucket} AS bucket, {usage_kind} AS kind, {group} AS key, cost_nanos, \
                   (session_id != '' AND (bucket, kind, key, project, session_id) IN \
                       (SELECT {outcome_bucket}, kind, {group}, project, arrayJoin(session_ids) FROM {outcomes})) \
                   OR (trace_id != '' AND (bucket, kind, key, project, trace_id) IN \
                       (SELECT {outcome_bucket}, kind, {group}, project, arrayJoin(trace_ids) FROM {outcomes})) \
                   OR (workflow_tag != '' AND (bucket, kind, key, project, workflow_tag) IN \
                       (SELECT {outcome_bucket}, kind, {group}, project, workflow_tag FROM {outcomes} \
                        AND empty(session_ids) AND empty(trace_ids))) \
                     AS linked \
                 FROM {db}.usage_events FINAL WHERE {usage_cond} \
               ) GROUP BY bucket, kind, key \
             ) GROUP BY bucket, kind, key"
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn rust_type_matches_avsc() {
        assert_eq!(
            Outcome::codec().unwrap().canonical_form(),
            Outcome::get_schema().canonical_form(),
            "schemas/avro/outcome.avsc and the Outcome struct have drifted apart"
        );
    }

    #[test]
    fn round_trips() {
        let o = Outcome {
            outcome_id: "pr-4812".into(),
            kind: "merged_pr".into(),
            value: Some(1.5),
            occurred_at_us: 1_765_000_000_000_000,
            received_at_us: 1_765_000_000_000_001,
            envelope: Envelope { project: Some("search".into()), ..Envelope::default() },
            api_key_id: Some("k1".into()),
            session_ids: vec!["s1".into(), "s2".into()],
            trace_ids: vec!["4bf92f3577b34da6a3ce929d0e0e4736".into()],
        };
        let codec = Outcome::codec().unwrap();
        let back: Outcome = codec.decode(&codec.encode(&o).unwrap()).unwrap();
        assert_eq!(back, o);
        assert_eq!(o.key(), "search/pr-4812");
    }

    #[test]
    fn kinds_are_words() {
        for ok in ["merged_pr", "resolved_ticket", "a", "deal2"] {
            assert!(valid_kind(ok), "{ok}");
        }
        for bad in ["", "Merged", "2pr", "merged-pr", "merged pr", &"a".repeat(65)] {
            assert!(!valid_kind(bad), "{bad}");
        }
    }
}
