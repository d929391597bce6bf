-- Rollup windows (minute, hour, day, month) by the envelope dimensions and model, exact under
-- replays. Each row belongs to one Kafka partition and holds ABSOLUTE totals of that
-- partition's events in the window; `version` is the partition offset those totals cover. A
-- replayed batch rewrites the same totals with the same or a higher version, so
-- ReplacingMergeTree(version) keeps the most complete row and nothing is counted twice (a
-- materialized view would fire on every inserted block and double-count replays). Read with
-- FINAL and sum over kafka_partition.
CREATE TABLE IF NOT EXISTS {db}.usage_windows (
    granularity String,
    window_start DateTime,
    project String,
    team String,
    user_id String,
    cost_center String,
    workflow_tag String,
    environment String,
    api_key_id String,
    virtual_model String,
    provider String,
    model String,
    model_version String,
    kafka_partition Int32,
    requests Int64,
    errors Int64,
    input_tokens Int64,
    output_tokens Int64,
    cached_input_tokens Int64,
    cache_write_tokens Int64,
    reasoning_tokens Int64,
    cost_nanos Int64,
    latency_us_sum Int64,
    version UInt64
) ENGINE = ReplacingMergeTree(version)
PARTITION BY toYYYYMM(window_start)
ORDER BY (granularity, window_start, project, team, user_id, cost_center, workflow_tag, environment, api_key_id, virtual_model, provider, model, model_version, kafka_partition);

-- Tokens per session per hour, for loop analysis; same exactness scheme as usage_windows.
CREATE TABLE IF NOT EXISTS {db}.session_hours (
    hour DateTime,
    workflow_tag String,
    session_id String,
    project String,
    team String,
    user_id String,
    kafka_partition Int32,
    requests Int64,
    input_tokens Int64,
    output_tokens Int64,
    cost_nanos Int64,
    version UInt64
) ENGINE = ReplacingMergeTree(version)
PARTITION BY toYYYYMM(hour)
ORDER BY (hour, workflow_tag, session_id, project, team, user_id, kafka_partition);

-- Per partition, the next offset whose event is not yet in the windows: where the meter resumes.
CREATE TABLE IF NOT EXISTS {db}.meter_checkpoints (
    topic String,
    kafka_partition Int32,
    next_offset UInt64,
    written_at DateTime DEFAULT now()
) ENGINE = ReplacingMergeTree(next_offset)
ORDER BY (topic, kafka_partition);
