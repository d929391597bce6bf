-- Every position (topic, partition, offset) at which the meter read each usage event. The
-- ingress re-sends an event whose delivery it could not confirm (same event id and key, so the
-- same partition, at a later offset); the rollups count an event id at its first position only.
-- A MergeTree, not a ReplacingMergeTree: no copy is ever merged away, so the first one stays
-- known whenever a re-sent copy comes back (usage_events keeps the last copy inserted).
CREATE TABLE IF NOT EXISTS {db}.event_positions (
    event_id String,
    kafka_topic String,
    kafka_partition Int32,
    kafka_offset Int64,
    ended_at DateTime
) ENGINE = MergeTree()
PARTITION BY toYYYYMM(ended_at)
ORDER BY (event_id, kafka_topic, kafka_partition, kafka_offset);
