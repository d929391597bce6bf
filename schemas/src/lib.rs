//! Types that cross Tollgate's process boundaries: usage events, policy documents, the price card.

pub mod avro;
pub mod decision;
pub mod measures;
pub mod names;
pub mod outcome;
pub mod policy;
pub mod price;
pub mod rules;
pub mod usage;
pub mod window;

/// Kafka topic names fixed by the contract (DESIGN.md, "Contracts").
pub mod topics {
    pub const USAGE: &str = "tollgate.usage.v1";
    pub const BREACHES: &str = "tollgate.breaches.v1";
    pub const ALERTS: &str = "tollgate.alerts.v1";
    /// Usage events the meter could not decode, with the reason in headers.
    pub const USAGE_DEAD_LETTERS: &str = "tollgate.usage.dlq.v1";
    /// The enforcers' heartbeats (which one is active) and how far alert delivery has got; one
    /// partition, keyed by the group's lease name.
    pub const ENFORCER_LEASE: &str = "tollgate.enforcer-lease.v1";
    /// Outcomes posted to the ingress (`POST /v1/outcomes`), keyed `project/outcome_id`.
    pub const OUTCOMES: &str = "tollgate.outcomes.v1";
}
