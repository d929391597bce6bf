-- Outcomes posted to the ingress (POST /v1/outcomes, topic tollgate.outcomes.v1), one row per
-- (project, outcome_id): a re-post of the same id, and a record the meter reads again, collapse on
-- it (the copy read last wins; read with FINAL). Not partitioned by time: a re-post may carry
-- another occurred_at, and ReplacingMergeTree collapses rows only within one partition. Each row
-- carries its Kafka position so the meter resumes where the table ends.
CREATE TABLE IF NOT EXISTS {db}.outcome_events (
    outcome_id String,
    kind String,
    value Nullable(Float64),
    occurred_at DateTime,
    occurred_at_us Int64,
    received_at_us Int64,
    project String,
    team String,
    user_id String,
    session_id String,
    workflow_tag String,
    environment String,
    cost_center String,
    api_key_id String,
    session_ids Array(String),
    trace_ids Array(String),
    kafka_topic String,
    kafka_partition Int32,
    kafka_offset Int64,
    inserted_at DateTime DEFAULT now()
) ENGINE = ReplacingMergeTree()
ORDER BY (project, outcome_id);

-- Cost per outcome per calendar month (UTC), kind and team / workflow: outcomes, the spend on
-- them and the spend that produced none of that kind (tollgate_schemas::outcome::sql).
CREATE VIEW IF NOT EXISTS {db}.cost_per_outcome_by_team AS
SELECT bucket AS month, kind, key AS team, outcomes, value, outcome_cost_nanos, other_cost_nanos,
    if(outcomes > 0, outcome_cost_nanos / outcomes, 0) AS cost_per_outcome_nanos
FROM ({cost_per_outcome_by_team});

CREATE VIEW IF NOT EXISTS {db}.cost_per_outcome_by_workflow AS
SELECT bucket AS month, kind, key AS workflow_tag, outcomes, value, outcome_cost_nanos, other_cost_nanos,
    if(outcomes > 0, outcome_cost_nanos / outcomes, 0) AS cost_per_outcome_nanos
FROM ({cost_per_outcome_by_workflow});
