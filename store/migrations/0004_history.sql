-- History of the enforcer's breach decisions (tollgate.breaches.v1) and alerts
-- (tollgate.alerts.v1), with the Kafka position of each row so the meter resumes where the
-- tables end. A replayed record collapses on its key: (rule_id, scope, version) for decisions,
-- alert_id for alerts; read with FINAL for exact figures before merges run.
CREATE TABLE IF NOT EXISTS {db}.breach_history (
    rule_id String,
    rule_kind String,
    scope String,
    state String,
    action String,
    audit UInt8,
    cut_streams UInt8,
    measure String,
    limit_value Int64,
    observed Int64,
    headroom Int64,
    window_start_us Int64,
    window_end_us Int64,
    decided_at DateTime,
    decided_at_us Int64,
    version Int64,
    kafka_topic String,
    kafka_partition Int32,
    kafka_offset Int64,
    inserted_at DateTime DEFAULT now()
) ENGINE = ReplacingMergeTree()
PARTITION BY toYYYYMM(decided_at)
ORDER BY (rule_id, scope, version);

CREATE TABLE IF NOT EXISTS {db}.alert_history (
    alert_id String,
    rule_id String,
    kind String,
    severity String,
    scope String,
    threshold_pct Int32,
    measure String,
    limit_value Int64,
    observed Int64,
    window_start_us Int64,
    window_end_us Int64,
    raised_at DateTime,
    raised_at_us Int64,
    summary String,
    notify Array(String),
    kafka_topic String,
    kafka_partition Int32,
    kafka_offset Int64,
    inserted_at DateTime DEFAULT now()
) ENGINE = ReplacingMergeTree()
PARTITION BY toYYYYMM(raised_at)
ORDER BY alert_id;

-- Each scope's decisions in order, for "when was this team blocked, and why".
CREATE VIEW IF NOT EXISTS {db}.breaches AS
SELECT decided_at, rule_kind, rule_id, scope, state, action, audit, measure, limit_value, observed,
       headroom, window_end_us, version
FROM {db}.breach_history FINAL;

CREATE VIEW IF NOT EXISTS {db}.alerts AS
SELECT raised_at, kind, severity, rule_id, scope, threshold_pct, measure, limit_value, observed, summary, notify
FROM {db}.alert_history FINAL;
